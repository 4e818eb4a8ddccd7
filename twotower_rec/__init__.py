"""Two-tower retrieval on TorchRec."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """This package's and its libraries' versions, as checkpoints and exports record them."""
    import torch
    import torchrec

    return {"twotower_rec": __version__, "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "unknown")}
