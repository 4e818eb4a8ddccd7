"""The read side of an export: load and verify it, answer top-K queries, the ANN index, HTTP.

Nothing here imports training code or TorchRec: a serving host needs the export directory,
torch, numpy, pandas and faiss.
"""
