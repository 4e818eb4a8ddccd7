"""The built-in synthetic data set: structure a model can learn and a popularity list cannot.

Items belong to latent clusters, each user likes a few clusters, and consecutive interactions
tend to stay in the cluster of the previous one (so recent history matters). With
``transition_probability`` > 0 some of those steps move instead to the successor of the
previous cluster in a fixed cycle over the clusters (a planted Markov chain), so the order of
the history matters too: a pooled bag of it cannot tell which cluster came last. Everything is
drawn from one generator seeded by ``data.synthetic.seed``, in a fixed order, vectorized (20M
rows fit in a few GiB).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower_rec.data.raw import RawData

if TYPE_CHECKING:
    from twotower_rec.config import SyntheticConfig


def synthetic(cfg: SyntheticConfig) -> RawData:
    """Generate a deterministic data set from ``cfg.seed``.

    Args:
        cfg: the ``data.synthetic`` section (sizes, clusters, probabilities, seed).
    """
    rng = np.random.default_rng(cfg.seed)
    items, item_cluster, item_weight = _items(rng, cfg)
    users, liked, liked_weight = _users(rng, cfg)
    user_of, cluster = _cluster_walks(rng, cfg, liked, liked_weight)
    item = _items_in_clusters(rng, cluster, item_cluster, item_weight, cfg.num_clusters)

    # Users rarely re-rate the same item: keep each (user, item) pair's first event only.
    pair = user_of.astype(np.int64) * cfg.num_items + item
    _, first = np.unique(pair, return_index=True)
    keep = np.sort(first)
    user_of, item, cluster = user_of[keep], item[keep], cluster[keep]

    timestamp = _timestamps(rng, user_of, cfg.num_users)
    top_cluster = liked[user_of, np.argmax(liked_weight, axis=1)[user_of]]
    rating = np.clip(np.round(3.4 + 1.0 * (cluster == top_cluster) + rng.normal(0, 0.8, keep.size)), 1, 5)
    interactions = pd.DataFrame({
        "user": users["user"].to_numpy()[user_of],
        "item": items["item"].to_numpy()[item],
        "timestamp": timestamp.astype(np.int64),
        "rating": rating.astype(np.float32),
    })
    return RawData(interactions=interactions, users=users, items=items, name=f"synthetic(seed={cfg.seed})")


def _items(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Items: a cluster each, a heavy-tailed popularity, genres and a year tied to the cluster.
    Returns the items table, each item's cluster and its popularity weight."""
    num_items, num_clusters = cfg.num_items, cfg.num_clusters
    item_cluster = rng.integers(0, num_clusters, num_items)
    item_weight = rng.pareto(1.2, num_items) + 0.05
    primary_genre = (np.arange(num_clusters) * 7) % cfg.num_genres
    second_genre = (np.arange(num_clusters) * 11 + 3) % cfg.num_genres
    extra_genre = rng.integers(0, cfg.num_genres, num_items)
    has_second = rng.random(num_items) < 0.5
    has_extra = rng.random(num_items) < 0.2
    genre_names = np.array([f"genre_{g:02d}" for g in range(cfg.num_genres)])
    genres = [
        sorted({genre_names[primary_genre[c]]}
               | ({genre_names[second_genre[c]]} if s else set())
               | ({genre_names[e]} if x else set()))
        for c, s, e, x in zip(item_cluster, has_second, extra_genre, has_extra)
    ]
    cluster_year = rng.integers(1950, 2020, num_clusters)
    year = np.clip(cluster_year[item_cluster] + rng.normal(0, 6, num_items).round().astype(int), 1930, 2025)
    items = pd.DataFrame({
        "item": np.arange(num_items, dtype=np.int64) + 1000,
        "genres": genres,
        "year": year.astype(np.int64),
        "title": [f"Item {i + 1000} ({y})" for i, y in zip(range(num_items), year)],
    })
    return items, item_cluster, item_weight


def _users(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Users: a few liked clusters with Dirichlet weights; occupation and age leak a little
    taste. Returns the users table, each user's liked clusters ``[U, k]`` and their weights."""
    num_users = cfg.num_users
    liked = np.argsort(rng.random((num_users, cfg.num_clusters)), axis=1)[:, : cfg.clusters_per_user]
    liked_weight = rng.dirichlet(np.ones(cfg.clusters_per_user), num_users)
    occupation = np.where(rng.random(num_users) < 0.6, liked[:, 0] % 21, rng.integers(0, 21, num_users))
    age_groups = np.array([1, 18, 25, 35, 45, 50, 56])
    age = age_groups[np.where(rng.random(num_users) < 0.5, liked[:, 0] % 7, rng.integers(0, 7, num_users))]
    users = pd.DataFrame({
        "user": np.arange(num_users, dtype=np.int64) + 1,
        "gender": np.where(rng.random(num_users) < 0.5, "F", "M"),
        "age": age.astype(np.int64),
        "occupation": occupation.astype(np.int64),
    })
    return users, liked, liked_weight


def _cluster_walks(rng: np.random.Generator, cfg: SyntheticConfig, liked: np.ndarray,
                   liked_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence lengths, then a cluster per step: a fresh draw from the user's mixture on a
    "switch", otherwise the cluster of the step before (forward fill of switch positions).
    Returns each step's user index and cluster, users in order."""
    num_users = cfg.num_users
    lengths = np.maximum(5, (cfg.interactions_per_user * rng.lognormal(0, 0.5, num_users)).astype(np.int64))
    total = int(lengths.sum())
    user_of = np.repeat(np.arange(num_users), lengths)
    starts = np.cumsum(lengths) - lengths
    step = np.arange(total) - np.repeat(starts, lengths)
    switch = (rng.random(total) > cfg.stay_probability) | (step == 0)
    cum_weight = np.cumsum(liked_weight, axis=1)[user_of]
    pick = (rng.random(total)[:, None] > cum_weight).sum(axis=1).clip(max=cfg.clusters_per_user - 1)
    drawn_cluster = liked[user_of, pick]
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(total), 0))
    cluster = drawn_cluster[last_switch]
    if cfg.transition_probability > 0:
        cluster = _planted_transitions(cfg, switch, last_switch, cluster)
    return user_of, cluster


def _planted_transitions(cfg: SyntheticConfig, switch: np.ndarray, last_switch: np.ndarray,
                         cluster: np.ndarray) -> np.ndarray:
    """Steps that did not switch move, with ``transition_probability``, to the successor of the
    step before's cluster in one random cycle over the clusters: a step ``m`` moves after its
    last switch sits ``m`` places further along the cycle. A generator of its own keeps every
    other draw of the data set as it is without the signal."""
    rng = np.random.default_rng([cfg.seed, 1])
    cycle = rng.permutation(cfg.num_clusters)  # cycle[i] is followed by cycle[i + 1]
    place = np.empty_like(cycle)
    place[cycle] = np.arange(cfg.num_clusters)
    move = ~switch & (rng.random(switch.size) < cfg.transition_probability)
    moves = np.cumsum(move)
    moved = moves - moves[last_switch]  # moves since the last switch (a switch is never a move)
    return cycle[(place[cluster] + moved) % cfg.num_clusters]


def _items_in_clusters(rng: np.random.Generator, cluster: np.ndarray, item_cluster: np.ndarray,
                       item_weight: np.ndarray, num_clusters: int) -> np.ndarray:
    """An item index within each step's cluster, by popularity: one searchsorted over
    cluster-sorted weights."""
    order = np.argsort(item_cluster, kind="stable")
    cum = np.cumsum(item_weight[order])
    cluster_total = np.bincount(item_cluster, weights=item_weight, minlength=num_clusters)
    cluster_before = np.cumsum(cluster_total) - cluster_total
    target = cluster_before[cluster] + rng.random(cluster.size) * cluster_total[cluster]
    position = np.minimum(np.searchsorted(cum, target, side="right"), item_cluster.size - 1)
    return order[position]


def _timestamps(rng: np.random.Generator, user_of: np.ndarray, num_users: int) -> np.ndarray:
    """Increasing event times within each user's run of events (exponential gaps from a
    random start per user)."""
    gaps = rng.exponential(3600.0, user_of.size).astype(np.int64) + 1
    user_start_time = 978_300_000 + rng.integers(0, 10**8, num_users)
    run_starts = np.flatnonzero(np.r_[True, user_of[1:] != user_of[:-1]])
    run_lengths = np.diff(np.r_[run_starts, user_of.size])
    cum_gaps = np.cumsum(gaps)
    cum_gaps -= np.repeat(cum_gaps[run_starts] - gaps[run_starts], run_lengths)
    return user_start_time[user_of] + cum_gaps


def write_parquet(cfg: SyntheticConfig, out_dir, users_per_file: int = 500_000, log=print) -> dict:
    """The same kind of data set written in blocks of users, for sizes whose events do not
    fit in memory: ``out_dir/interactions/part-NNNNN.parquet`` (user, item, timestamp,
    rating), ``out_dir/users.parquet`` and ``out_dir/items.parquet`` (genres ``|``-joined).

    Block ``b`` draws from a generator seeded by (``cfg.seed``, b), so its events differ from
    :func:`synthetic`'s for the same config; memory is one block's. Returns the counts.

    Args:
        cfg: the ``data.synthetic`` section.
        out_dir: the folder to write into; created if missing.
        users_per_file: the users in each block (one interactions file each).
        log: called with a progress line after each block.

    Returns:
        ``{"interactions", "users", "items"}``: how many of each were written.
    """
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    items, item_cluster, item_weight = _items(np.random.default_rng([cfg.seed, 0]), cfg)
    pq.write_table(pa.Table.from_pandas(items.assign(genres=items["genres"].str.join("|")), preserve_index=False),
                   out / "items.parquet")
    user_tables, rows = [], 0
    for block, first in enumerate(range(0, cfg.num_users, users_per_file)):
        count = min(users_per_file, cfg.num_users - first)
        block_cfg = dataclasses.replace(cfg, num_users=count)
        rng = np.random.default_rng([cfg.seed, block + 1])
        users, liked, liked_weight = _users(rng, block_cfg)
        user_of, cluster = _cluster_walks(rng, block_cfg, liked, liked_weight)
        item = _items_in_clusters(rng, cluster, item_cluster, item_weight, cfg.num_clusters)
        _, first_of_pair = np.unique(user_of.astype(np.int64) * cfg.num_items + item, return_index=True)
        keep = np.sort(first_of_pair)  # each (user, item) pair's first event, as synthetic() keeps
        user_of, item = user_of[keep], item[keep]
        timestamp = _timestamps(rng, user_of, count)
        rating = np.clip(np.round(3.4 + rng.normal(0, 0.8, user_of.size)), 1, 5)
        table = pa.table({
            "user": (user_of + first + 1).astype(np.int64), "item": items["item"].to_numpy()[item],
            "timestamp": timestamp.astype(np.int64), "rating": rating.astype(np.float32),
        })
        pq.write_table(table, out / "interactions" / f"part-{block:05d}.parquet")
        user_tables.append(users.assign(user=users["user"] + first))
        rows += table.num_rows
        log(f"synthetic: block {block + 1}: {first + count} of {cfg.num_users} users, {rows} events")
    pq.write_table(pa.Table.from_pandas(pd.concat(user_tables, ignore_index=True), preserve_index=False),
                   out / "users.parquet")
    return {"interactions": rows, "users": cfg.num_users, "items": cfg.num_items}
