"""Training modes, one file each (the interface is :class:`twotower_rec.tasks.base.Task`).

- ``retrieval``: one example per interaction; in-batch sampled softmax with logQ, accidental-hit
  masking, mixed uniform negatives, and the sampled-batch (``retrieval.batch_negatives``) and
  chunked variants.
- ``pointwise``: one example per interaction; BCE on ``rating >= pointwise.rating_threshold``
  or rating MSE, through a learned ``scale * cos + bias`` head.
- ``next_item``: one example per window of a user's training sequence, every position of it
  scoring the next item(s) in one causal pass.
- ``bpr``: one example per interaction; each positive against the batch's other items, pairwise.

Every module of this package is imported here, so a task registers itself by being a file
(its class sets ``name``); :func:`task_class` and :func:`make_task` look one up by the
config's ``task``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from twotower_rec.tasks.base import TASKS, Task

if TYPE_CHECKING:
    from twotower_rec.config import Config

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name`` (a value of the config's ``task``).

    Args:
        name: the task's ``name``, e.g. ``retrieval``.
    """
    return TASKS[name]


def make_task(cfg: Config) -> Task:
    """A new instance of ``cfg.task``'s class for one run (training, validation or evaluation).

    Args:
        cfg: the run's validated config.
    """
    return TASKS[cfg.task](cfg)


__all__ = ["TASKS", "Task", "make_task", "task_class"]
