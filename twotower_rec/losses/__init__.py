"""Training objectives over L2-normalised query and item embeddings: the in-batch sampled
softmax with its corrections (``softmax``) and the pointwise BCE / MSE ones (``pointwise``)."""
