"""Two-tower retrieval on TorchRec.

The Python API (``twotower_rec/api.py``): :func:`prepare`, :func:`train`, :func:`evaluate`,
:func:`export`, :func:`load_export` and :func:`load_config`, imported when first used, so
``import twotower_rec`` stays light (a serving host imports no TorchRec through it).
"""

__version__ = "0.2.0"

API = ("prepare", "train", "evaluate", "export", "load_export", "load_config", "EvalResult")


def __getattr__(name: str):
    """The API's names, imported from ``twotower_rec.api`` on first use."""
    if name in API:
        from twotower_rec import api

        return getattr(api, name)
    raise AttributeError(f"module 'twotower_rec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])


def versions() -> dict[str, str]:
    """This package's and its libraries' versions, as checkpoints and exports record them."""
    import torch
    import torchrec

    return {"twotower_rec": __version__, "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "unknown")}
