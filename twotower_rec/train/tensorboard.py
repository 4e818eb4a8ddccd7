"""TensorBoard curves of a training run (``train.tensorboard``), written by rank 0 alone to
``<train.out_dir>/tensorboard``.

The trainer talks to :class:`Curves` (or, when the curves are off or on another rank, to
:class:`NoCurves`, which does nothing) through three calls: ``scalars(step, {tag: value})``,
``flush()`` and ``close()``. Values are only written where they already reach the host: the
per-step losses when the trainer reads them (every ``train.log_every_steps`` steps and before
each validation or checkpoint), never with a sync of their own.

The ``tensorboard`` package is imported only when the curves are on: ``train.tensorboard:
false`` (or null without the package) costs no import at start-up.

Usage::

    tensorboard --logdir runs/demo/train/tensorboard
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from twotower_rec.distributed.env import DistEnv, broadcast_object
from twotower_rec.errors import ConfigError

FOLDER = "tensorboard"  # under train.out_dir
# What a validation counts rather than measures (the sample's size): not curves.
VALIDATION_COUNTS = ("events", "users", "pairs")


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package can be imported here (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


def resolve(option: bool | None, installed: bool) -> bool:
    """``train.tensorboard`` as on or off.

    Args:
        option: ``train.tensorboard``: None follows ``installed``; True needs it; False is off.
        installed: whether the ``tensorboard`` package is importable (:func:`tensorboard_installed`).

    Raises:
        ConfigError: ``option`` is True and the package is missing.
    """
    if option is True and not installed:
        raise ConfigError("train.tensorboard=true: the tensorboard package is not installed; `pip install "
                          "tensorboard` (bash launch/setup.sh installs it) or set train.tensorboard=false")
    return installed if option is None else option


def writes_curves(option: bool | None, env: DistEnv) -> bool:
    """Whether this rank writes the curves: rank 0 decides, and when it refuses
    (``train.tensorboard=true`` without the package) every rank raises, so all stop together.
    A collective under a process group.

    Args:
        option: ``train.tensorboard``.
        env: the process group; only rank 0 writes.

    Raises:
        ConfigError: on every rank, from :func:`resolve` on rank 0, or when the package does not import there.
    """
    on, error = False, None
    if env.is_main:
        try:
            on = resolve(option, tensorboard_installed())
            if on:
                import torch.utils.tensorboard  # noqa: F401  here, so a broken install stops every rank
        except ConfigError as err:
            error = str(err)
        except ImportError as err:
            error = (f"train.tensorboard: the tensorboard package is installed but does not import ({err}); "
                     "reinstall it (`pip install -U tensorboard`) or set train.tensorboard=false")
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    return on


class NoCurves:
    """The curves when they are off (or on a rank other than 0): every call does nothing."""

    on = False
    folder: Path | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Nothing.

        Args:
            step: ignored.
            values: ignored.
        """

    def flush(self) -> None:
        """Nothing."""

    def close(self) -> None:
        """Nothing."""


class Curves:
    """Scalars into a ``torch.utils.tensorboard.SummaryWriter`` on ``folder``."""

    on = True

    def __init__(self, folder: str | Path, start_step: int = 0) -> None:
        """Args:
            folder: the event files' folder (made if missing); a folder of an earlier run is appended to.
            start_step: the step the run starts after (0, or a resumed run's): TensorBoard hides the
                events an earlier run wrote for later steps (``purge_step``), which this run writes again.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One point of each curve in ``values`` at ``step``.

        Args:
            step: the training step (1-based: step 1 is the first trained).
            values: tag (e.g. ``train/loss``, ``val/ndcg@10``) -> value.
        """
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write what is queued to the event file (TensorBoard then shows it)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_curves(out_dir: str | Path, on: bool, start_step: int = 0) -> Curves | NoCurves:
    """:class:`Curves` in ``<out_dir>/tensorboard`` when ``on``, else :class:`NoCurves`.

    Args:
        out_dir: ``train.out_dir``.
        on: from :func:`writes_curves` (False on every rank but 0).
        start_step: the step the run starts after (see :class:`Curves`).
    """
    return Curves(Path(out_dir) / FOLDER, start_step) if on else NoCurves()


def validation_scalars(result: dict) -> dict[str, float]:
    """A validation's metrics as ``val/<metric>`` tags, without its sample counts.

    Args:
        result: one validation's metrics (e.g. ``ndcg@10``, ``mrr``, the task's pair metrics).
    """
    return {f"val/{name}": float(value) for name, value in result.items()
            if name not in VALIDATION_COUNTS and isinstance(value, (int, float)) and not isinstance(value, bool)}
