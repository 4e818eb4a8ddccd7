"""The interface of a training mode: :class:`Task`.

A task says what one training example is, how a global batch of them becomes this rank's
batch, the loss of the towers' embeddings, the head it adds to the model (a pointwise score,
a learned temperature), its checks against the config and the prepared data, and what it adds
to validation and ``evaluate``. The trainer, the step, validation, the model factory and the
Python API call only this interface; nothing outside ``twotower_rec/tasks/`` branches on the
mode.

A task is one file under ``twotower_rec/tasks/``: a subclass with a ``name`` registers itself
(``tasks/__init__.py`` imports every module of the package), and its ``Options`` dataclass,
if it has one, becomes the config section ``section`` (``config.py`` adds it to ``Config``);
each of its fields carries its help as a docstring on the line after it, as ``config.py``'s do.
A task file imports nothing of ``twotower_rec.config`` at module level (the config imports
the tasks), nor of the later stages (train, export, serving).

Shapes: ``B`` this rank's queries (rows or, for a task with ``every_position``, scored
positions), ``N`` the item rows of its batch, ``D`` the embedding dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from twotower_rec.data.splits import TRAIN
from twotower_rec.distributed.collect import local_slice
from twotower_rec.errors import ConfigError

if TYPE_CHECKING:
    from twotower_rec.config import Config
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.distributed.env import DistEnv

TASKS: dict[str, type["Task"]] = {}  # name -> class, filled as the task modules are imported


class Task:
    """One training mode. Class attributes describe it; a run makes one instance (``Task(cfg)``).

    Class attributes:
        name: the value of the config's ``task``.
        section: the config section of its own options (``Options``), or None.
        Options: the dataclass of that section, or None.
        reads: the options of other tasks' sections and of the shared ``loss`` section it
            reads: a section name (all of it) or dotted keys; what it does not read is reported
            when set (``config.config_warnings``).
        every_position: the model's forward gives a query per scored position of a window
            (``TwoTower.encode_positions``) instead of one per row.
        pipelined: TorchRec's train pipeline may run its steps (``train.pipeline``).
        ensembles: ``model.members > 1`` may train it.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    Options: ClassVar[type | None] = None
    reads: ClassVar[tuple[str, ...]] = ()
    every_position: ClassVar[bool] = False
    pipelined: ClassVar[bool] = True
    ensembles: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in TASKS:
                raise TypeError(f"two tasks are named {cls.name!r}: {TASKS[cls.name].__module__}, {cls.__module__}")
            TASKS[cls.name] = cls

    def __init__(self, cfg: Config) -> None:
        """Args:
            cfg: the run's validated config.
        """
        self.cfg = cfg
        self.options = getattr(cfg, self.section) if self.section else None

    # --- the config ---------------------------------------------------------------------

    @classmethod
    def reads_option(cls, key: str) -> bool:
        """Whether this task reads the option ``key`` (``section.name``) of a task or loss section.

        Args:
            key: a dotted option, e.g. ``loss.logq``.
        """
        section = key.split(".", 1)[0]
        return section == cls.section or section in cls.reads or key in cls.reads

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        """Raise :class:`~twotower_rec.errors.ConfigError` for a value of its own section that
        is never valid (a range, a choice): checked whichever task the config names.

        Args:
            cfg: the whole config; it reads its own section (``section``).
        """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise :class:`~twotower_rec.errors.ConfigError` for values this task cannot train
        with (combinations with other sections): checked when the config names this task.

        Args:
            cfg: the whole config, after every task's :meth:`check_options`.
        """

    @classmethod
    def metrics(cls, cfg: Config) -> tuple[str, ...]:
        """Validation metrics it adds to the ranking ones, which ``train.select_metric`` may name.

        Args:
            cfg: the whole config (e.g. its own section's objective decides them).

        Returns:
            Keys of :meth:`pair_metrics`' result, each larger-is-better (hence ``neg_`` names for
            losses); none by default.
        """
        return ()

    def check_data(self, data: PreparedData, env: DistEnv) -> None:
        """Raise :class:`~twotower_rec.errors.ConfigError` when the prepared data or the world
        size cannot train this task (checked before the model is built).

        Args:
            data: the prepared data.
            env: the process group (its world size).
        """

    # --- the model ----------------------------------------------------------------------

    def head(self) -> nn.Module | None:
        """A module of the task's own parameters that the model carries (``TwoTower.head``), or None."""
        return None

    def init_head(self, model: nn.Module, data: PreparedData) -> None:
        """Set the head's starting values from the training data (before sharding), in place.

        Args:
            model: the unsharded model, whose head (``model.head``) is that of :meth:`head`.
            data: the prepared data (its training rows).
        """

    # --- training examples --------------------------------------------------------------

    def training_examples(self, batcher: Batcher) -> int:
        """How many examples an epoch shuffles (made here once, at start-up; rows or windows).

        Args:
            batcher: builds batches from the prepared data; the examples are kept on the task for
                :meth:`batch`.
        """
        raise NotImplementedError

    def negatives_per_batch(self) -> int:
        """Items drawn uniformly from the catalog per global batch (split over the ranks)."""
        return 0

    def batch(self, batcher: Batcher, examples: np.ndarray, negatives: np.ndarray | None, env: DistEnv):
        """This rank's batch of one global batch.

        Args:
            batcher: builds KJT batches from the prepared data.
            examples: ``[G]`` positions of the global batch's examples among
                :meth:`training_examples`, in batch order (the same on every rank).
            negatives: this rank's share of the global batch's uniform negatives (item codes), or None.
            env: the process group (rank and world size).
        """
        raise NotImplementedError

    def step_examples(self, batch: Any) -> int:
        """Examples of the global batch a step trained on (what examples/s counts).

        Args:
            batch: this rank's batch, as :meth:`batch` built it. The default ignores it and counts
                ``train.batch_size``.
        """
        return self.cfg.train.batch_size

    # --- the loss -----------------------------------------------------------------------

    def start(self, data: PreparedData, env: DistEnv, step: int, state: dict | None = None) -> None:
        """Before the first step: what the loss needs beyond a batch (e.g. logQ frequencies),
        from step ``step`` on, restored from :meth:`state_dict`'s ``state`` when resuming.

        Args:
            data: the prepared data (e.g. its training item counts).
            env: the process group (its device and world size).
            step: the step training starts at: 0, or the resumed checkpoint's step.
            state: what :meth:`state_dict` returned when the resumed checkpoint was saved; None
                when training from scratch.
        """

    def loss(self, model: nn.Module, query: torch.Tensor, item: torch.Tensor, batch: Any) -> torch.Tensor:
        """The scalar loss of this rank's batch.

        Args:
            model: the (DMP-wrapped) model, for its head (``model.module.head``).
            query: ``[B, D]`` float32 query embeddings the model's forward gave.
            item: ``[N, D]`` float32 item embeddings of the batch's item rows.
            batch: the batch itself (ids, labels, targets).
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the loss keeps across steps, for ``last`` (``train --resume``)."""
        return {}

    def train_summary(self, model: nn.Module) -> dict:
        """Entries for ``train_metrics.json`` beyond the loop's (e.g. a learned temperature).

        Args:
            model: the (DMP-wrapped) trained model, for its head (``model.module.head``).
        """
        return {}

    # --- validation and evaluate --------------------------------------------------------

    def pair_metrics(self, model: nn.Module, data: PreparedData, batcher: Batcher, rows: np.ndarray,
                     device: torch.device | None = None) -> dict[str, float] | None:
        """Metrics of the (query, held-out item) pairs at ``rows`` beside the ranking ones
        (validation adds them; ``evaluate`` reports them), or None.

        Args:
            model: the (DMP-wrapped) model.
            data: the prepared data.
            batcher: builds the pairs' batches.
            rows: ``[R]`` interaction rows of the split: validation's, or the ones ``evaluate`` ranked.
            device: where to run the towers; None leaves the batches where the batcher builds them.
        """
        return None

    def describe_pairs(self, metrics: dict[str, float]) -> str:
        """One line for ``evaluate``'s output of :meth:`pair_metrics`' result.

        Args:
            metrics: what :meth:`pair_metrics` returned (not None).
        """
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class EventTask(Task):
    """A task whose examples are the training interactions, one query per row: an epoch
    shuffles the training rows, and a rank's batch is its contiguous slice of a global batch,
    each query built from the user's earlier training events (``Batcher.batch``)."""

    def training_examples(self, batcher: Batcher) -> int:
        self.rows = batcher.data.rows(TRAIN)
        batcher.training_events  # noqa: B018 (which events a row may see: computed and cached now, at start-up)
        return int(self.rows.size)

    def batch(self, batcher: Batcher, examples: np.ndarray, negatives: np.ndarray | None, env: DistEnv):
        return batcher.batch(self.rows[local_slice(examples, env.rank, env.world_size)], negatives, training=True)


def check_uniform_share(uniform: int, world_size: int) -> None:
    """Refuse ``loss.uniform_negatives`` that the ranks cannot draw in equal shares.

    Args:
        uniform: ``loss.uniform_negatives``, the uniform items per global batch.
        world_size: the number of processes.
    """
    if uniform % world_size:
        raise ConfigError(f"loss.uniform_negatives={uniform} must be divisible by the world size {world_size}: each "
                          f"process draws an equal share (e.g. {max(world_size, uniform - uniform % world_size)})")
