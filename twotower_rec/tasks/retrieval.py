"""``task: retrieval`` (the default): one example per training interaction, the in-batch
sampled softmax of the shared ``loss`` section.

Each query is scored against the items of the (global) batch and ``loss.uniform_negatives``
uniform items, with logQ and accidental-hit masking (``losses/softmax.py``). Its own section
``retrieval`` picks how the softmax is computed: over every candidate at once (default),
``chunk_size`` candidates at a time (the same loss in O(B x chunk) memory), against a sample of
``batch_negatives`` of the batch's positives (a different objective whose cost grows linearly
with the batch), or through ``torch.compile`` (``compile``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twotower_rec.errors import ConfigError
from twotower_rec.losses.softmax import retrieval_loss
from twotower_rec.tasks._softmax import SoftmaxTask, note
from twotower_rec.tasks.base import EventTask

if TYPE_CHECKING:
    from twotower_rec.config import Config


@dataclass
class RetrievalOptions:
    """``retrieval``: how the in-batch softmax of an event batch is computed."""

    chunk_size: int = 0
    """0 computes the [B, N] logits at once; > 0 scores this many candidates at a time (losses/chunked.py). The
    same loss with O(B x chunk_size) memory, for large batches."""
    batch_negatives: int = 0
    """0 scores every row against every positive of the (global) batch; > 0 against this many of them. They are
    drawn without replacement each step (the same draw on every rank), plus its own positive and the uniform
    negatives: [B, 1 + batch_negatives + uniform_negatives] logits, so a step's cost grows linearly with the batch
    (BENCHMARKS.md, "Batch scaling")."""
    compile: bool = False
    """torch.compile the whole-batch softmax (losses/compiled.py), off by default. It compiles at the first step
    and pays only in long runs (BENCHMARKS.md, "retrieval.compile")."""


class RetrievalTask(SoftmaxTask, EventTask):
    """In-batch retrieval over events; see the module docstring."""

    name = "retrieval"
    section = "retrieval"
    Options = RetrievalOptions
    ensembles = True

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        options = cfg.retrieval
        for key, value, meaning in (("chunk_size", options.chunk_size, "all candidates at once"),
                                    ("batch_negatives", options.batch_negatives, "every positive of the batch")):
            if value < 0:
                raise ConfigError(f"retrieval.{key}: must be >= 0 (0 = {meaning}), got {value}")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        options = cfg.retrieval
        if options.batch_negatives:
            for key, value, why in (("retrieval.chunk_size", options.chunk_size, "bounds the logits already"),
                                    ("retrieval.compile", options.compile, "compiles the whole-batch loss only")):
                if value:
                    raise ConfigError(f"retrieval.batch_negatives={options.batch_negatives} scores a sample of the "
                                      f"batch, which {key} does not combine with ({why}): set one of them to 0 / "
                                      "false")

    def start(self, data, env, step: int, state: dict | None = None) -> None:
        super().start(data, env, step, state)
        if self.options.compile:
            from twotower_rec.losses.compiled import compiled_loss

            self.ctx.kernel = compiled_loss()
            note("retrieval.compile: the in-batch softmax is compiled at the first step", env)

    def loss(self, model, query, item, batch):
        return retrieval_loss(query, item, batch.item_ids, self.temperature(model), self.cfg.loss, self.ctx,
                              self.options.batch_negatives, self.options.chunk_size)
