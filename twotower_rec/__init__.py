"""Two-tower retrieval on TorchRec."""

__version__ = "0.1.0"
