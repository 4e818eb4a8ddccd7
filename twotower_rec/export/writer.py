"""Write the export directory (see ``export/__init__.py``) from an unsharded model.

Everything is written beside the export and swapped in (``atomic.py``), so a crash leaves the
previous export whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from twotower_rec import atomic, versions
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.evaluation.ranking import catalog_embeddings, query_embeddings
from twotower_rec.export.query_encoder import build_query_encoder
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.serving import ann
from twotower_rec.serving import manifest as export_manifest

if TYPE_CHECKING:
    from twotower_rec.config import ExportConfig


def write_export(model: TwoTower | Ensemble, data: PreparedData, cfg_dict: dict, out_dir: str | Path,
                 export_cfg: ExportConfig, metrics: dict | None = None) -> Path:
    """Write the export directory atomically from an *unsharded* CPU ``model``.

    Args:
        model: the trained model, unsharded, on the CPU.
        data: the prepared data it was trained on.
        cfg_dict: the config it was trained with (written to the manifest).
        out_dir: the export directory (replaced whole).
        export_cfg: the ``export`` section (dtype, ANN index).
        metrics: validation and evaluation metrics for the manifest.

    Returns:
        ``out_dir``.
    """
    cfg = export_cfg
    out_dir = Path(out_dir)
    tmp = atomic.new_folder(out_dir)
    model = model.eval()
    batcher = Batcher(data)
    item_emb = _write_items(tmp, model, data, batcher, cfg)
    ann_info = _ann_section(cfg, item_emb, model, data, batcher, tmp)
    encoder = build_query_encoder(model, data.spec.query_features, data)
    torch.jit.save(torch.jit.script(encoder), str(tmp / "query_tower.pt"))
    _write_users(tmp, data)
    manifest = _manifest(tmp, model, data, item_emb, cfg, cfg_dict, metrics, ann_info)
    (tmp / export_manifest.MANIFEST).write_text(json.dumps(manifest, indent=2))
    atomic.swap_in(tmp, out_dir)
    recall = (f"; {ann_info['kind']} index recall@10 {ann_info['recall@10']:.4f}, recall@100 "
              f"{ann_info['recall@100']:.4f} against exact search" if ann_info else "")
    print(f"export: {item_emb.shape[0]} items x {item_emb.shape[1]} dims, {data.spec.num_users} users -> "
          f"{out_dir}{recall}", file=sys.stderr)
    return out_dir


def _write_items(out: Path, model: TwoTower | Ensemble, data: PreparedData, batcher: Batcher,
                 cfg: ExportConfig) -> np.ndarray:
    """``item_embeddings.npy``, ``item_ids.npy``, ``items.parquet``; the ``[N, D]`` float32 embeddings."""
    with torch.no_grad():
        item_emb = catalog_embeddings(model.encode_items, batcher)[1:].numpy().astype(np.float32)
    np.save(out / "item_embeddings.npy", item_emb.astype(np.float16 if cfg.dtype == "float16" else np.float32))
    np.save(out / "item_ids.npy", np.asarray(data.raw_item_ids))
    data.item_metadata().drop(columns=["code"]).to_parquet(out / "items.parquet", index=False)
    return item_emb


def _write_users(out: Path, data: PreparedData) -> None:
    """``users.npz`` (raw ids, histories as CSR, side-feature codes) and ``vocabularies.json``."""
    user_arrays = {
        "raw_user_ids": np.asarray(data.raw_user_ids),
        "history_offsets": np.asarray(data.user_offsets),
        "history_items": np.asarray(data.item),
    }
    for name, column in data.user_features.items():
        user_arrays[f"feature_{name}"] = np.asarray(column)
    np.savez(out / "users.npz", **user_arrays)
    (out / "vocabularies.json").write_text(json.dumps(data.spec.vocabularies, indent=2))


def _manifest(out: Path, model: TwoTower | Ensemble, data: PreparedData, item_emb: np.ndarray, cfg: ExportConfig,
              cfg_dict: dict, metrics: dict | None, ann_info: dict | None) -> dict:
    """The manifest of the files written to ``out`` so far (see ``serving/manifest.py``)."""
    spec = data.spec
    return {
        "format_version": export_manifest.FORMAT_VERSION,
        "metric": export_manifest.METRIC,
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
        "pointwise": ({"objective": cfg_dict["pointwise"]["objective"], **model.head.serving_info()}
                      if hasattr(model.head, "serving_info") else None),
        "files": export_manifest.file_entries(out),
    }


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
    return {"kind": cfg.ann, "file": "items.faiss", "metric": export_manifest.METRIC,
            "params": {k: v for k, v in vars(params).items() if k != "kind"},
            "build_seconds": round(build_s, 3), "recall_queries": int(users.size), **recall}
