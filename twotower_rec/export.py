"""Export what a serving system needs, from a checkpoint and its prepared data.

The export directory (written to ``<dir>.tmp`` and renamed into place)::

    manifest.json          format version, versions, dims, metric, dtype, feature order, files
                           and their sizes, ANN recall, data fingerprint, evaluation metrics
    item_embeddings.npy    [N, D] float32 (or float16 with export.dtype), L2-normalised;
                           row r is raw item id item_ids[r]
    item_ids.npy           [N] raw item ids
    items.parquet          raw id, title, genres (where the data has them)
    items.faiss            ANN index over item_embeddings (export.ann: flat | hnsw | ivf)
    query_tower.pt         TorchScript QueryEncoder (no TorchRec needed to load or call it)
    users.npz              known users: raw ids, side-feature codes, interaction history (item
                           codes, time order, CSR) so `recommend --user` needs nothing else
    vocabularies.json      small categorical vocabularies (feature -> raw values; code = index + 1)

Calling ``query_tower.pt`` (``torch.jit.load``; only torch is needed):

- ``encode_raw(features: Dict[str, List[List[str]]]) -> Tensor[B, D]``: raw values as
  strings, one list per row, for the names in ``manifest["query_features"]``, e.g.
  ``{"user_id": [["42"]], "gender": [["M"]], "history": [["1", "50", "260"]]}``. Single-valued
  features take one value per row (side features take the values listed in
  vocabularies.json); ``history`` takes the raw ids of the items the user interacted with,
  oldest first (the last ``history_length`` are used), and so does each ``recent_m`` (its
  m-th last item is used). Unknown values, and features left
  out, are the out-of-vocabulary bucket: a new user is ``user_id`` left out.
- ``forward(values: List[Tensor], lengths: List[Tensor]) -> Tensor[B, D]``: the same on
  encoded ids, one (values, lengths) pair per name in ``manifest["query_features"]``, in that
  order; values are int64 codes (0 = unknown), lengths per-row counts. Item codes are
  ``row + 1`` of ``item_ids.npy``.

The query embedding's dot product with ``item_embeddings`` rows is the model's score. For an
ensemble (``model.members`` = K > 1) both are the K members' embeddings side by side, divided
by ``sqrt(K)``, so the score is the mean of the members' cosines.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twotower_rec import ann
from twotower_rec.config import ExportConfig
from twotower_rec.data.batches import Batcher
from twotower_rec.data.features import HISTORY, Feature, recent_position
from twotower_rec.data.prepared import PreparedData
from twotower_rec.evaluation import catalog_embeddings, query_embeddings
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.sequence import SEQUENCE_TABLE
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.train.checkpoint import versions

EXPORT_FORMAT_VERSION = 2


class MemberQueryEncoder(nn.Module):
    """One TwoTower's query tower with plain ``nn.EmbeddingBag`` tables: scriptable, TorchRec-free.

    ``forward(values, lengths)``: per feature, ``values[f]`` ``[sum(lengths[f])]`` int64 and
    ``lengths[f]`` ``[B]`` -> ``[B, D]`` L2-normalised query embeddings.
    """

    def __init__(self, weights: list[torch.Tensor], poolings: list[str], mlp: nn.Sequential,
                 sequence_table: torch.Tensor | None = None, sequence_pooling: nn.Module | None = None) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag.from_pretrained(w.clone(), freeze=True, mode=p) for w, p in zip(weights, poolings)]
        )
        # model.user_encoder=sequence: the last input is the history, read by the sequence encoder
        # (a list of zero or one, which TorchScript can loop over).
        self.sequence_tables = nn.ModuleList(
            [nn.Embedding.from_pretrained(sequence_table.clone(), freeze=True)] if sequence_table is not None else [])
        self.sequence_pooling = nn.ModuleList([sequence_pooling] if sequence_pooling is not None else [])
        self.mlp = mlp

    def forward(self, values: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        pooled: List[torch.Tensor] = []
        last = 0
        for index, bag in enumerate(self.bags):
            counts = lengths[index].long()
            offsets = torch.cumsum(counts, 0) - counts
            pooled.append(bag(values[index].long(), offsets))
            last = index + 1
        for table in self.sequence_tables:
            for pooling in self.sequence_pooling:
                pooled.append(pooling(table(values[last].long()), lengths[last]))
        return F.normalize(self.mlp(torch.cat(pooled, dim=1)), dim=-1)


class QueryEncoder(nn.Module):
    """The served query tower: raw values or codes -> ``[B, D_out]`` L2-normalised embeddings.

    One :class:`MemberQueryEncoder` per model member; with K > 1 (``model.members``) their
    outputs are concatenated and divided by ``sqrt(K)``, as ``model/ensemble.py`` does.
    """

    def __init__(self, members: list[MemberQueryEncoder], feature_names: list[str] | None = None,
                 vocabularies: dict[str, dict[str, int]] | None = None, history_length: int = 0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / float(np.sqrt(len(members)))
        # torch.jit.Attribute: the types TorchScript cannot infer from (possibly empty) containers
        self.feature_names = torch.jit.Attribute(list(feature_names or []), List[str])
        self.vocabularies = torch.jit.Attribute(dict(vocabularies or {}), Dict[str, Dict[str, int]])
        self.history_length = history_length
        self.recent = torch.jit.Attribute({n: recent_position(n) for n in feature_names or [] if recent_position(n)},
                                          Dict[str, int])

    @torch.jit.export
    def encode_raw(self, features: Dict[str, List[List[str]]]) -> torch.Tensor:
        """Raw values (strings) per feature and row -> ``[B, D]``; see the module docstring."""
        batch = -1
        for name, rows in features.items():
            if name not in self.vocabularies:
                raise ValueError("unknown query feature '" + name + "'; expected one of " + str(self.feature_names))
            if batch == -1:
                batch = len(rows)
            elif len(rows) != batch:
                raise ValueError("every feature needs the same number of rows; '" + name + "' has " + str(len(rows)))
        if batch <= 0:
            raise ValueError("give at least one feature with at least one row")
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for name in self.feature_names:
            vocab = self.vocabularies[name]
            codes: List[int] = []
            counts: List[int] = []
            rows: List[List[str]] = []
            if name in features:
                rows = features[name]
            else:
                for _ in range(batch):
                    missing: List[str] = []
                    rows.append(missing)
            for row in rows:
                if name == "history":
                    kept = row[max(0, len(row) - self.history_length):]
                    for value in kept:
                        codes.append(vocab.get(value, 0))
                    counts.append(len(kept))
                elif name in self.recent:  # recent_m takes the whole history; its m-th last item is used
                    m = self.recent[name]
                    codes.append(vocab.get(row[len(row) - m], 0) if len(row) >= m else 0)
                    counts.append(1)
                else:
                    if len(row) > 1:
                        raise ValueError("feature '" + name + "' takes one value per row, got " + str(len(row)))
                    codes.append(vocab.get(row[0], 0) if len(row) == 1 else 0)
                    counts.append(1)
            values.append(torch.tensor(codes, dtype=torch.long))
            lengths.append(torch.tensor(counts, dtype=torch.long))
        return self.forward(values, lengths)

    def forward(self, values: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        """Codes per feature (see the module docstring) -> ``[B, D_out]``."""
        parts: List[torch.Tensor] = []
        for member in self.members:
            parts.append(member(values, lengths))
        return torch.cat(parts, dim=1) * self.scale  # one member: scale 1, the member's own vectors


def raw_vocabularies(data: PreparedData, names: list[str]) -> dict[str, dict[str, int]]:
    """Raw value (as a string) -> code for every query feature (code 0: unknown)."""
    out = {}
    for name in names:
        if name == "user_id":
            raw = data.raw_user_ids
        elif name == HISTORY or recent_position(name):
            raw = data.raw_item_ids
        else:
            raw = data.spec.vocabularies.get(name, [])
        out[name] = {str(v.item() if isinstance(v, np.generic) else v): code
                     for code, v in enumerate(np.asarray(raw, dtype=object).tolist(), start=1)}
    return out


def _member_encoder(model: TwoTower, features: list[Feature]) -> MemberQueryEncoder:
    """Copy one unsharded TwoTower's query-side tables and query MLP; inputs follow
    ``model.query_feature_order``, and a history that shares the item tower's item-id table
    takes its weights from there."""
    by_name = {f.name: f for f in features}
    tables = {**model.item_tower.embedding_bags.embedding_bags, **model.query_tower.embedding_bags.embedding_bags}
    names = list(model.query_feature_order)
    ordered = [by_name[name] for name in (names[:-1] if model.sequence is not None else names)]
    weights = [tables[f.table].weight.detach() for f in ordered]
    sequence_table = sequence_pooling = None
    if model.sequence is not None:
        sequence_table = model.sequence.embeddings.embeddings[SEQUENCE_TABLE].weight.detach()
        sequence_pooling = copy.deepcopy(model.sequence.pooling).eval()
    return MemberQueryEncoder(weights, [f.pooling for f in ordered], model.query_tower.mlp, sequence_table,
                              sequence_pooling)


def build_query_encoder(model: TwoTower | Ensemble, features: list[Feature],
                        data: PreparedData | None = None) -> QueryEncoder:
    """A :class:`QueryEncoder` from an unsharded TwoTower (or Ensemble: one member encoder each).
    With ``data`` the encoder also maps raw values (``encode_raw``)."""
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    names = list(model.query_feature_order)
    vocabularies = raw_vocabularies(data, names) if data is not None else {}
    history_length = data.spec.history_length if data is not None else 0
    encoders = [_member_encoder(m, features) for m in members]
    return QueryEncoder(encoders, names, vocabularies, history_length).eval()


def _ann_section(cfg: ExportConfig, item_emb: np.ndarray, model: TwoTower | Ensemble, data: PreparedData,
                 batcher: Batcher, out: Path) -> dict | None:
    """Build ``items.faiss`` and measure its recall against exact search on real user queries."""
    if cfg.ann == "none":
        return None
    params = ann.AnnParams(kind=cfg.ann, hnsw_m=cfg.hnsw_m, hnsw_ef_construction=cfg.hnsw_ef_construction,
                           hnsw_ef_search=cfg.hnsw_ef_search, ivf_nlist=cfg.ivf_nlist, ivf_nprobe=cfg.ivf_nprobe)
    vectors = item_emb.astype(np.float32)
    index, build_s = ann.timed_build(vectors, params)
    ann.write(index, out / "items.faiss")
    users = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    if users.size > cfg.recall_queries:
        users = np.sort(np.random.default_rng(0).choice(users, cfg.recall_queries, replace=False))
    with torch.no_grad():
        queries = query_embeddings(model.encode_query, batcher, users, data.user_offsets[users]).numpy()
    recall = ann.recall_against_exact(index, vectors, queries)
    return {"kind": cfg.ann, "file": "items.faiss", "metric": "inner_product",
            "params": {k: v for k, v in vars(params).items() if k != "kind"},
            "build_seconds": round(build_s, 3), "recall_queries": int(users.size), **recall}


def export(model: TwoTower | Ensemble, data: PreparedData, cfg_dict: dict, out_dir: str | Path,
           metrics: dict | None = None, export_cfg: ExportConfig | None = None) -> Path:
    """Write the export directory atomically from an *unsharded* CPU ``model``."""
    cfg = export_cfg or ExportConfig()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = data.spec
    model = model.eval()
    batcher = Batcher(data)

    with torch.no_grad():
        item_emb = catalog_embeddings(model.encode_items, batcher)[1:].numpy().astype(np.float32)
    np.save(tmp / "item_embeddings.npy", item_emb.astype(np.float16 if cfg.dtype == "float16" else np.float32))
    np.save(tmp / "item_ids.npy", np.asarray(data.raw_item_ids))
    data.item_metadata().drop(columns=["code"]).to_parquet(tmp / "items.parquet", index=False)
    ann_info = _ann_section(cfg, item_emb, model, data, batcher, tmp)

    encoder = build_query_encoder(model, spec.query_features, data)
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
        "metric": "inner_product",
        "normalized": True,
        "similarity": "dot product of L2-normalised embeddings (cosine)",
        "embedding_dim": int(item_emb.shape[1]),
        # model.members > 1: embedding_dim = members x output_dim, the members side by side
        "members": len(model.members) if isinstance(model, Ensemble) else 1,
        "embedding_dtype": cfg.dtype,
        "num_items": int(item_emb.shape[0]),
        "num_users": int(spec.num_users),
        "query_features": model.query_feature_order,
        "history_length": spec.history_length,
        "feature_spec_fingerprint": spec.fingerprint(),
        "data_source": spec.source,
        "data": data.summary(),
        "versions": versions(),
        "config": cfg_dict,
        "metrics": metrics or {},
        "ann": ann_info,
        # pointwise models: the pair score is scale * (query . item) + bias (a logit for bce)
        "pointwise": ({"objective": cfg_dict.get("loss", {}).get("name"), "scale": float(model.score_scale),
                       "bias": float(model.score_bias)} if model.score_scale is not None else None),
        "files": {p.name: {"bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old = out_dir.with_name(f"{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    recall = (f"; {ann_info['kind']} index recall@10 {ann_info['recall@10']:.4f}, recall@100 "
              f"{ann_info['recall@100']:.4f} against exact search" if ann_info else "")
    print(f"export: {item_emb.shape[0]} items x {item_emb.shape[1]} dims, {spec.num_users} users -> {out_dir}{recall}",
          file=sys.stderr)
    return out_dir
