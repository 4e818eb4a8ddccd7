"""The ranking side: exact chunked top-K, full-catalog metrics, baselines, pointwise metrics.

``topk`` needs only torch, so serving uses it too; the rest evaluates checkpoints.
"""
