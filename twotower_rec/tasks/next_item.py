"""``task: next_item``: one example per window of a user's training sequence; every position
of it is a query that scores the next item (or the next ``future_targets``), all in one causal
pass of the causal history encoder (``model.history_encoder: causal``).

Windows (``Batcher.training_windows``) are the last ``features.history_length + 1`` training
events of each user (``windows: last``) or tiles cut back from the end (``tiled``) so every
training event after a user's first is a target once per epoch. A position's candidates are the
global batch's deduplicated targets and ``loss.uniform_negatives`` uniform items, with logQ
for how likely each is among them (``losses/softmax.py``, ``sequence_loss``); ``train.batch_size``
counts windows, and examples/s counts positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twotower_rec.data.features import HISTORY
from twotower_rec.errors import ConfigError, check_choice
from twotower_rec.losses.softmax import future_positives, sequence_loss
from twotower_rec.tasks._softmax import SoftmaxTask

if TYPE_CHECKING:
    from twotower_rec.config import Config

WINDOWS = ("last", "tiled")


@dataclass
class NextItemOptions:
    """``next_item``: which windows are trained on and what each position scores."""

    windows: str = "tiled"
    """Which windows of a user with more than features.history_length + 1 training events are trained on: last |
    tiled. last: the last history_length + 1 events only (one window per user). tiled: windows of history_length + 1
    events cut back from the end, overlapping by one event, so every training event after a user's first is a
    target once per epoch."""
    window_context: int = 0
    """tiled: the first positions of every window after a user's first that are context only (not scored); must be
    below features.history_length. Windows then start every history_length - window_context items, so every target
    there reads at least that many earlier items, as evaluation's queries read up to history_length; each item is
    still a target once per epoch. 0: windows overlap by one item and every position is scored."""
    mask_window_items: bool = False
    """Drop the other items of a position's own window from its candidates (the user's other events, before or
    after it, are not negatives)."""
    future_targets: int = 1
    """A position's positives are the next k items of its window (1: the next one only). Its loss is the mean of
    their log-softmax over the same candidates (a short-horizon form of PinnerFormer's dense all-action loss;
    BENCHMARKS.md, "Sequence mode")."""


class NextItemTask(SoftmaxTask):
    """Causal next-item training over windows; see the module docstring."""

    name = "next_item"
    section = "next_item"
    Options = NextItemOptions
    every_position = True
    pipelined = False  # its batches' candidates depend on the whole global batch: stepped one by one

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        options = cfg.next_item
        check_choice("next_item.windows", options.windows, WINDOWS)
        if options.future_targets < 1:
            raise ConfigError(f"next_item.future_targets: must be positive, got {options.future_targets}")
        if options.window_context < 0:
            raise ConfigError(f"next_item.window_context: must be >= 0, got {options.window_context}")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        options, loss, features = cfg.next_item, cfg.loss, cfg.features
        if cfg.model.history_encoder != "causal":
            raise ConfigError("task=next_item reads every position of a window in one causal pass: it needs "
                              f"model.history_encoder=causal, not {cfg.model.history_encoder}")
        if not loss.global_negatives:
            raise ConfigError("task=next_item scores every position against the global batch's targets: it needs "
                              "loss.global_negatives=true")
        if loss.logq == "streaming":
            raise ConfigError("task=next_item: loss.logq=streaming is not supported (use counts or none)")
        if cfg.train.pipeline == "always":
            raise ConfigError("task=next_item runs its steps one by one: set train.pipeline to auto or never")
        if not 0 <= options.window_context < features.history_length:
            raise ConfigError(f"next_item.window_context: must lie in [0, features.history_length="
                              f"{features.history_length}), got {options.window_context}")

    def check_data(self, data, env) -> None:
        super().check_data(data, env)
        from twotower_rec.data.batches import Batcher

        windows = self._windows(Batcher(data)).shape[0]
        if windows < env.world_size:
            raise ConfigError(f"only {windows} training windows (users with two or more training events) for "
                              f"{env.world_size} processes")

    def _windows(self, batcher):
        return batcher.training_windows(batcher.spec.history_length, self.options.windows,
                                        self.options.window_context)

    def training_examples(self, batcher) -> int:
        self.windows = self._windows(batcher)
        return int(self.windows.shape[0])

    def batch(self, batcher, examples, negatives, env):
        return batcher.window_batch(self.windows[examples], env.rank, env.world_size, negatives)

    def step_examples(self, batch) -> int:
        return batch.global_positions  # every scored position of the global batch

    def loss(self, model, query, item, batch):
        # query: [P, D], one per scored position; item: [C, D] this rank's candidates
        scored = batch.query_features[HISTORY].lengths().long() - batch.first_position  # [B] positions a window
        window_items = positives = None
        if self.options.mask_window_items:  # [P, U]: each scored position's row of its window's items
            window_items = batch.window_items.repeat_interleave(scored, dim=0,
                                                                output_size=batch.target_index.shape[0])
        if self.options.future_targets > 1:  # [P, k]: the next k targets of each position's window
            positives = future_positives(batch.target_index, scored, self.options.future_targets)
        return sequence_loss(query, item, batch.item_ids, batch.num_targets, batch.target_index,
                             batch.global_positions, self.temperature(model), self.cfg.loss, self.ctx, window_items,
                             positives)
