"""Full-catalog top-K evaluation from embeddings, and the most-popular baseline beside it.

For each evaluated event (one per user under leave-last-out) the query is built from the
user's history strictly before the held-out item; every catalog item is scored; items the
user interacted with before the event are filtered when ``filter_seen``; the held-out item's
rank gives the metrics. With one held-out item per query, Recall@K equals HR@K; MRR is
computed over the top ``max(ks)`` (0 beyond it). A held-out item unseen in training (its
code is the OOV bucket) can never be retrieved and counts as a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.query_inputs import ranges_csr
from twotower_rec.data.splits import split_name
from twotower_rec.distributed.collect import gather_parts, local_part
from twotower_rec.errors import DataError
from twotower_rec.evaluation.metrics import ranking_metrics
from twotower_rec.evaluation.topk import chunked_topk

if TYPE_CHECKING:
    from twotower_rec.config import EvalConfig

EmbedFn = Callable[..., torch.Tensor]


def seen_items(data: PreparedData, user: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR of each query's items at rows ``[user start, position)``: what the user had seen.

    Args:
        data: the prepared data.
        user: ``[Q]`` user codes.
        position: ``[Q]`` interaction rows; query ``q`` saw its user's items before row ``position[q]``.

    Returns:
        ``(offsets [Q + 1], values)``: query ``q``'s item codes are ``values[offsets[q]:offsets[q + 1]]``.
    """
    return ranges_csr(np.asarray(data.item), data.user_offsets[user - 1], position)


@torch.no_grad()
def catalog_embeddings(encode_items: EmbedFn, batcher: Batcher, chunk: int = 4096,
                       device: torch.device | None = None) -> torch.Tensor:
    """``[V + 1, D]`` item embeddings by item code (row 0, the OOV bucket, is never recommended).

    Under a process group each rank encodes its share of the catalog; all ranks get the whole,
    on ``device`` (it stays there for ranking).

    Args:
        encode_items: the item tower, ``(kjt, dense) -> [B, D]``.
        batcher: builds the item features of item codes.
        chunk: items encoded at a time.
        device: where to run ``encode_items``; ``None``: the features stay where ``batcher`` builds them.
    """
    codes = np.arange(batcher.spec.num_items + 1, dtype=np.int64)
    local = local_part(codes)
    parts = []
    for begin in range(0, local.size, chunk):
        kjt, dense = batcher.item_features(local[begin:begin + chunk])
        if device is not None:
            kjt, dense = kjt.to(device), dense.to(device)
        parts.append(encode_items(kjt, dense).float())
    return gather_parts(torch.cat(parts), codes.size)


@torch.no_grad()
def query_embeddings(encode_query: EmbedFn, batcher: Batcher, user: np.ndarray, position: np.ndarray,
                     chunk: int = 4096, device: torch.device | None = None, gather: bool = True) -> torch.Tensor:
    """``[Q, D]`` query embeddings as of each (user, position).

    Under a process group each rank encodes its share of the queries; with ``gather`` all
    ranks get the whole, without it each keeps its (padded) share of :func:`local_part`; on
    ``device``.

    Args:
        encode_query: the query tower, ``kjt -> [B, D]``.
        batcher: builds the query features.
        user: ``[Q]`` user codes.
        position: ``[Q]`` interaction rows; query ``q`` sees its user's events strictly before row ``position[q]``.
        chunk: queries encoded at a time.
        device: where to run ``encode_query``; ``None``: the features stay where ``batcher`` builds them.
        gather: return every rank's queries (``True``) or only this rank's padded share.
    """
    local_user, local_position = local_part(user), local_part(position)
    parts = []
    for begin in range(0, local_user.size, chunk):
        kjt = batcher.query_features(local_user[begin:begin + chunk], local_position[begin:begin + chunk])
        parts.append(encode_query(kjt.to(device) if device is not None else kjt).float())
    local = torch.cat(parts) if parts else torch.zeros(0, 0, device=device)
    return gather_parts(local, user.size) if gather else local


def rank_catalog(query_emb: torch.Tensor, item_emb: torch.Tensor, k: int, seen: tuple | None,
                 chunk: int) -> torch.Tensor:
    """Top-``k`` item codes ``[Q, k]``; never the OOV code 0 nor a seen item (``-1`` pads short lists).
    Scored where the embeddings are (a GPU's, in evaluation); the lists stay there too.

    Args:
        query_emb: ``[Q, D]`` query embeddings.
        item_emb: ``[V + 1, D]`` item embeddings by item code; row 0 is the OOV bucket.
        k: items per list; clipped to ``[1, V]``.
        seen: CSR ``(offsets [Q + 1], values)`` of item codes to leave out per query (:func:`seen_items`);
            ``None``: leave none out.
        chunk: queries scored against the whole catalog at a time.
    """
    invalid = torch.zeros(item_emb.shape[0], dtype=torch.bool, device=item_emb.device)
    invalid[0] = True
    offsets, values = seen if seen is not None else (None, None)
    k = max(1, min(k, item_emb.shape[0] - 1))  # the OOV row is never a candidate
    scores, top = chunked_topk(query_emb, item_emb, k, offsets, values, chunk=chunk, invalid_columns=invalid)
    # When k exceeds what is left to recommend, topk fills up with excluded (-inf) columns.
    return top.masked_fill(torch.isneginf(scores), -1)


def evaluation_rows(data: PreparedData, split: int, max_users: int, seed: int) -> np.ndarray:
    """``[Q]`` interaction rows of the events of ``split`` to evaluate, in row order.

    Args:
        data: the prepared data.
        split: the split code (``TRAIN``, ``VALIDATION`` or ``TEST`` of ``data/splits.py``).
        max_users: keep a random sample of this many events when there are more; ``0``: keep every event.
        seed: seed of the sample.
    """
    rows = data.rows(split)
    if max_users and rows.size > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    return rows


@dataclass
class SplitRanking:
    """Ranked item codes per evaluated event: ``top[name]`` ``[Q, K]`` (``-1`` pads short lists).

    Args:
        rows: ``[Q]`` interaction rows of the evaluated events.
        user: ``[Q]`` their user codes.
        targets: ``[Q]`` their held-out item codes.
        top: list name (``model``, ``popularity``, a baseline) -> ``[Q, K]`` ranked item codes, best first.
    """

    rows: np.ndarray
    user: np.ndarray
    targets: torch.Tensor
    top: dict[str, torch.Tensor]


def rank_split(encode_query: EmbedFn, encode_items: EmbedFn, data: PreparedData, batcher: Batcher, cfg: EvalConfig,
               split: int, seed: int = 0, with_popularity: bool = True,
               device: torch.device | None = None) -> SplitRanking:
    """Rank the catalog for every event of ``split`` with the model (and most-popular).

    Args:
        encode_query: the query tower, ``kjt -> [B, D]``.
        encode_items: the item tower, ``(kjt, dense) -> [B, D]``.
        data: the prepared data.
        batcher: builds the towers' features from ``data``.
        cfg: the ``eval`` section: ``ks`` (lists are ``max(ks)`` long), ``filter_seen``, ``max_users``,
            ``user_chunk``.
        split: the split code to evaluate (``data/splits.py``).
        seed: seed of the ``max_users`` sample.
        with_popularity: also rank by training interaction counts (``top["popularity"]``).
        device: where to run the towers; ``None``: the features stay where ``batcher`` builds them.
    """
    rows = evaluation_rows(data, split, cfg.max_users, seed)
    if rows.size == 0:
        raise DataError(f"the {split_name(split)} split of {data.dir} is empty: nothing to evaluate")
    user = np.asarray(data.user)[rows]
    targets = torch.from_numpy(np.asarray(data.item)[rows])
    k = max(cfg.ks)
    item_emb = catalog_embeddings(encode_items, batcher, device=device)
    # Each rank ranks the catalog for its share of the queries; the ranked lists are gathered.
    local_user, local_rows = local_part(user), local_part(rows)
    seen = seen_items(data, local_user, local_rows) if cfg.filter_seen else None
    query_emb = query_embeddings(encode_query, batcher, user, rows, device=device, gather=False)
    # only the ranked lists come back to the host
    top = {"model": gather_parts(rank_catalog(query_emb, item_emb, k, seen, cfg.user_chunk), rows.size).cpu()}
    if with_popularity:
        counts = torch.from_numpy(data.item_counts().astype(np.float32)).unsqueeze(1).to(item_emb.device)  # [V + 1, 1]
        popular = rank_catalog(torch.ones(local_rows.size, 1, device=item_emb.device), counts, k, seen, cfg.user_chunk)
        top["popularity"] = gather_parts(popular, rows.size).cpu()
    return SplitRanking(rows, user, targets, top)


def evaluate(
    encode_query: EmbedFn,
    encode_items: EmbedFn,
    data: PreparedData,
    batcher: Batcher,
    cfg: EvalConfig,
    split: int,
    seed: int = 0,
    with_popularity: bool = True,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the model (and most-popular) on one split: ``{"model": {...}, "popularity": {...}}``.

    Args:
        encode_query: the query tower, ``kjt -> [B, D]``.
        encode_items: the item tower, ``(kjt, dense) -> [B, D]``.
        data: the prepared data.
        batcher: builds the towers' features from ``data``.
        cfg: the ``eval`` section: ``ks``, ``filter_seen``, ``max_users``, ``user_chunk``.
        split: the split code to evaluate (``data/splits.py``).
        seed: seed of the ``max_users`` sample.
        with_popularity: also rank by training interaction counts (``popularity``).
        device: where to run the towers; ``None``: the features stay where ``batcher`` builds them.
    """
    ranking = rank_split(encode_query, encode_items, data, batcher, cfg, split, seed, with_popularity, device)
    return split_metrics(ranking, cfg.ks)


def split_metrics(ranking: SplitRanking, ks: list[int]) -> dict[str, dict[str, float]]:
    """Each ranked list's metrics, with the number of evaluated ``events`` and of distinct
    ``users`` (one event per user under leave-last-out; any number under the other splits).

    Args:
        ranking: the ranked lists of :func:`rank_split`.
        ks: the cut-offs ``k``.
    """
    counts = {"events": float(ranking.rows.size), "users": float(np.unique(ranking.user).size)}
    return {name: {**ranking_metrics(top, ranking.targets, ks), **counts} for name, top in ranking.top.items()}


def save_topk(ranking: SplitRanking, data: PreparedData, path: str | Path, name: str = "model") -> Path:
    """Each evaluated event's ranked raw item ids and its held-out raw item id (.npz or .parquet).

    Columns: ``user``, ``held_out_item``, ``top_items`` (and ``timestamp`` in a .npz).

    Args:
        ranking: the ranked lists of :func:`rank_split`.
        data: the prepared data ``ranking`` was made from (for the raw ids).
        path: the file to write; its suffix, ``.npz`` or ``.parquet``, picks the format (folders are created).
        name: which list of ``ranking.top`` to save.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    top = ranking.top[name].numpy()
    raw_ids = np.asarray(data.raw_item_ids)
    ranked = np.where(top > 0, raw_ids[np.maximum(top - 1, 0)], None)
    users = np.asarray(data.raw_user_ids)[ranking.user - 1]
    held_out = data.raw_items_of_rows(ranking.rows)
    if path.suffix == ".parquet":
        pd.DataFrame({"user": users, "held_out_item": held_out,
                      "top_items": [[x for x in row if x is not None] for row in ranked]}).to_parquet(path, index=False)
    elif path.suffix == ".npz":
        # Plain arrays (no pickled objects): integer ids stay integers padded with -1, any other
        # ids become strings padded with "".
        np.savez(path, user=_plain(users), held_out_item=_plain(held_out), top_items=_plain(ranked),
                 timestamp=np.asarray(data.timestamp)[ranking.rows])
    else:
        raise DataError(f"--save-topk {path}: use a .npz or .parquet file name")
    return path


def _plain(ids: np.ndarray) -> np.ndarray:
    """Raw ids (object array, ``None`` for a pad) as an int64 (pad -1) or unicode (pad "") array."""
    ids = np.asarray(ids, dtype=object)
    present = [x for x in ids.ravel() if x is not None]
    if all(isinstance(x, (int, np.integer)) for x in present):
        return np.where(ids == None, -1, ids).astype(np.int64)  # noqa: E711 (elementwise)
    return np.where(ids == None, "", ids).astype(str)  # noqa: E711
