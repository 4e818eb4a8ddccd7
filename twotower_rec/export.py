"""Export what a serving system needs, from a checkpoint and its prepared data.

The export directory (written to ``<dir>.tmp`` and renamed into place)::

    manifest.json          format version, config, versions, dims, metric, feature order
    item_embeddings.npy    [N, D] float32, L2-normalised, row r = item raw id item_ids[r]
    item_ids.npy           [N] raw item ids
    items.parquet          raw id, title, genres (where the data has them)
    query_tower.pt         TorchScript QueryEncoder (no TorchRec needed to load or call it)
    users.npz              known users: raw ids, side-feature codes, interaction history (item
                           codes, time order, CSR) so `recommend --user` needs nothing else
    vocabularies.json      small categorical vocabularies (feature -> raw values; code = index + 1)

Calling ``query_tower.pt``: ``forward(values: List[Tensor], lengths: List[Tensor]) -> [B, D]``
with one (values, lengths) pair per name in ``manifest["query_features"]``, in that order;
values are int64 codes (0 = unknown), lengths are per-row counts (1 for single-valued
features; the last ``history_length`` item codes for ``history``). Item codes are
``row + 1`` of ``item_ids.npy``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twotower_rec.data.batches import Batcher
from twotower_rec.data.features import Feature
from twotower_rec.data.prepared import PreparedData
from twotower_rec.evaluation import catalog_embeddings
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.train.checkpoint import versions

EXPORT_FORMAT_VERSION = 1


class QueryEncoder(nn.Module):
    """A query tower with plain ``nn.EmbeddingBag`` tables: scriptable, TorchRec-free.

    ``forward(values, lengths)``: per feature, ``values[f]`` ``[sum(lengths[f])]`` int64 and
    ``lengths[f]`` ``[B]`` -> ``[B, D]`` L2-normalised query embeddings.
    """

    def __init__(self, weights: list[torch.Tensor], poolings: list[str], mlp: nn.Sequential) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag.from_pretrained(w.clone(), freeze=True, mode=p) for w, p in zip(weights, poolings)]
        )
        self.mlp = mlp

    def forward(self, values: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        pooled: List[torch.Tensor] = []
        for index, bag in enumerate(self.bags):
            counts = lengths[index].long()
            offsets = torch.cumsum(counts, 0) - counts
            pooled.append(bag(values[index].long(), offsets))
        return F.normalize(self.mlp(torch.cat(pooled, dim=1)), dim=-1)


def build_query_encoder(model: TwoTower, features: list[Feature]) -> QueryEncoder:
    """Copy an unsharded TwoTower's query-side tables and query MLP into a :class:`QueryEncoder`.

    Inputs follow ``model.query_feature_order``; a history that shares the item tower's
    item-id table takes its weights from there.
    """
    by_name = {f.name: f for f in features}
    tables = {**model.item_tower.embedding_bags.embedding_bags, **model.query_tower.embedding_bags.embedding_bags}
    ordered = [by_name[name] for name in model.query_feature_order]
    weights = [tables[f.table].weight.detach() for f in ordered]
    return QueryEncoder(weights, [f.pooling for f in ordered], model.query_tower.mlp).eval()


def export(model: TwoTower, data: PreparedData, cfg_dict: dict, out_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write the export directory atomically from an *unsharded* CPU ``model``."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = data.spec
    model = model.eval()
    batcher = Batcher(data)

    with torch.no_grad():
        item_emb = catalog_embeddings(model.encode_items, batcher)[1:].numpy().astype(np.float32)
    np.save(tmp / "item_embeddings.npy", item_emb)
    np.save(tmp / "item_ids.npy", np.asarray(data.raw_item_ids))
    data.item_metadata().drop(columns=["code"]).to_parquet(tmp / "items.parquet", index=False)

    encoder = build_query_encoder(model, spec.query_features)
    torch.jit.save(torch.jit.script(encoder), str(tmp / "query_tower.pt"))

    user_arrays = {
        "raw_user_ids": np.asarray(data.raw_user_ids),
        "history_offsets": np.asarray(data.user_offsets),
        "history_items": np.asarray(data.item),
    }
    for name, column in data.user_features.items():
        user_arrays[f"feature_{name}"] = np.asarray(column)
    np.savez(tmp / "users.npz", **user_arrays)
    (tmp / "vocabularies.json").write_text(json.dumps(spec.vocabularies, indent=2))

    manifest = {
        "format_version": EXPORT_FORMAT_VERSION,
        "similarity": "dot (embeddings are L2-normalised: cosine)",
        "embedding_dim": int(item_emb.shape[1]),
        "num_items": int(item_emb.shape[0]),
        "num_users": int(spec.num_users),
        "query_features": model.query_feature_order,
        "history_length": spec.history_length,
        "feature_spec_fingerprint": spec.fingerprint(),
        "data_source": spec.source,
        "versions": versions(),
        "config": cfg_dict,
        "metrics": metrics or {},
        "files": sorted(p.name for p in tmp.iterdir()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old = out_dir.with_name(f"{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"export: {item_emb.shape[0]} items x {item_emb.shape[1]} dims, {spec.num_users} users -> {out_dir}",
          file=sys.stderr)
    return out_dir
