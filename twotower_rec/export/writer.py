"""Write the export directory (see ``export/__init__.py``) from an unsharded model.

Everything is written beside the export and swapped in (``atomic.py``), so a crash leaves the
previous export whole. Every file goes through Python's own file I/O (the faiss index, and the
query tower: ``torch.export.save`` and ``torch.jit.save`` write to an open file handle, because
``torch.jit.save`` to a path aborted the process in C++ on a full disk), so a failed write is an
``ExportError`` naming the folder, and the previous export stays. A tower larger than
``IN_MEMORY_BYTES`` is written only once the folder is seen to have room for it.
Only an export (or an empty or missing folder) is replaced: :func:`check_target`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

import numpy as np
import torch

from twotower_rec import atomic, versions
from twotower_rec.data.batches import Batcher
from twotower_rec.data.ids import canonical_id
from twotower_rec.data.prepared import PreparedData
from twotower_rec.errors import ExportError
from twotower_rec.evaluation.ranking import catalog_embeddings, query_embeddings
from twotower_rec.export.pt2 import save_program
from twotower_rec.export.query_encoder import build_query_encoder, build_query_tower, export_program
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.serving import ann
from twotower_rec.serving import manifest as export_manifest

if TYPE_CHECKING:
    from twotower_rec.config import ExportConfig

IN_MEMORY_BYTES = 128 << 20  # a larger query tower is written only where the disk has room (_save_query_tower)


def check_target(out_dir: str | Path) -> None:
    """``ExportError`` unless ``out_dir`` is missing, empty or an export: ``export`` replaces it whole, so
    a folder of anything else (a run's ``train.out_dir``, a user's files) is refused, untouched.

    Args:
        out_dir: the export directory about to be written.
    """
    out_dir = Path(out_dir)
    atomic.recover(out_dir)  # a swap a kill interrupted leaves the export under another name for a moment
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"export directory {out_dir} is a file, not an export: point --out / export.dir at a new "
                          "or empty folder (export replaces the whole folder)")
    if any(out_dir.iterdir()) and not export_manifest.is_export(out_dir):
        raise ExportError(f"export directory {out_dir} exists and is not an export (no {export_manifest.MANIFEST} "
                          "written by twotower-rec): point --out / export.dir at a new or empty folder (export "
                          "replaces the whole folder)")


def write_export(model: TwoTower | Ensemble, data: PreparedData, cfg_dict: dict, out_dir: str | Path,
                 export_cfg: ExportConfig, metrics: dict | None = None, note: str = "") -> Path:
    """Write the export directory atomically from an *unsharded* CPU ``model``.

    Args:
        model: the trained model, unsharded, on the CPU.
        data: the prepared data it was trained on.
        cfg_dict: the config it was trained with (written to the manifest).
        out_dir: the export directory (replaced whole; only an export, or an empty or missing folder).
        export_cfg: the ``export`` section (dtype, ANN index).
        metrics: validation and evaluation metrics for the manifest.
        note: appended to the log line (e.g. an evaluation left out).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_target(out_dir)
    try:
        tmp = atomic.new_folder(out_dir)
    except OSError as err:
        raise _write_error(out_dir, err) from None
    try:
        item_emb, ann_info = _write_files(tmp, model, data, cfg_dict, export_cfg, metrics)
        atomic.swap_in(tmp, out_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        atomic.recover(out_dir)  # a swap that failed between its renames: the old export back
        raise _write_error(out_dir, err) from None
    recall = (f"; {ann_info['kind']} index recall@10 {ann_info['recall@10']:.4f}, recall@100 "
              f"{ann_info['recall@100']:.4f} against exact search" if ann_info else "")
    print(f"export: {item_emb.shape[0]} items x {item_emb.shape[1]} dims, {data.spec.num_users} users -> "
          f"{out_dir}{recall}{'; ' + note if note else ''}", file=sys.stderr)
    return out_dir


def _write_error(out_dir: Path, err: OSError) -> ExportError:
    """The one-line error of a write that failed (full disk, read-only folder)."""
    where = f" ({err.filename})" if err.filename else ""
    return ExportError(f"cannot write the export {out_dir}: {err.strerror or err}{where}; the previous export, "
                       "if any, is kept")


def _write_files(tmp: Path, model: TwoTower | Ensemble, data: PreparedData, cfg_dict: dict, cfg: ExportConfig,
                 metrics: dict | None) -> tuple[np.ndarray, dict | None]:
    """Every file of the export into ``tmp``; the ``[N, D]`` float32 item embeddings and the ANN section."""
    model = model.eval()
    batcher = Batcher(data)
    item_emb = _write_items(tmp, model, data, batcher, cfg)
    ann_info = _ann_section(cfg, item_emb, model, data, batcher, tmp)
    _write_query_towers(tmp, model, data, cfg)
    _write_users(tmp, data)
    manifest = _manifest(tmp, model, data, item_emb, cfg, cfg_dict, metrics, ann_info)
    _write_bytes(tmp / export_manifest.MANIFEST, json.dumps(manifest, indent=2).encode())
    return item_emb, ann_info


def _write_query_towers(out: Path, model: TwoTower | Ensemble, data: PreparedData, cfg: ExportConfig) -> None:
    """``query_tower.pt2`` (``torch.export``), and with ``export.torchscript`` the deprecated ``query_tower.pt``."""
    names, size = list(model.query_feature_order), _tensor_bytes(model)
    program = export_program(build_query_tower(model, data.spec.query_features), names, data.spec.history_length)
    _save_query_tower(lambda handle: save_program(program, handle), out / "query_tower.pt2", size)
    if not cfg.torchscript:
        return
    scripted = torch.jit.script(build_query_encoder(model, data.spec.query_features, data))
    _save_query_tower(lambda handle: torch.jit.save(scripted, handle), out / "query_tower.pt", size, large_to_path=True)
    print("export: warning: export.torchscript=true also writes query_tower.pt (TorchScript), which is deprecated "
          "(PyTorch deprecated torch.jit.script) and goes in the next release; serving reads query_tower.pt2",
          file=sys.stderr)


def _save_query_tower(save: Callable[[IO[bytes] | str], None], path: Path, size: int,
                      large_to_path: bool = False) -> None:
    """Write a query tower with ``save(handle)`` such that a failed write is an ``OSError``, never a C++ abort.

    torch writes to a Python file handle, so a full disk is Python's ``OSError``. A tower of more
    than :data:`IN_MEMORY_BYTES` (``size``: the model's tensors, an upper bound) is written only
    once the folder is seen to have room for it. :func:`save_program` streams one tensor at a time
    to the handle; ``torch.jit.save`` serialises the whole module in memory first (about two more
    copies of its tables), so a large TorchScript tower (``large_to_path``) is written by torch to
    the path itself.
    """
    if size > IN_MEMORY_BYTES:
        free = _free_bytes(path.parent)
        if free < size + (64 << 20):
            raise OSError(errno.ENOSPC, f"{free >> 20} MiB free, the query tower needs up to {size >> 20} MiB",
                          str(path.parent))
        if large_to_path:
            save(str(path))
            return
    with open(path, "wb") as handle:
        save(handle)


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through Python's file I/O (an ``OSError`` when the disk is full)."""
    with open(path, "wb") as handle:
        handle.write(data)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, _plain(path.name, array), allow_pickle=False)


def _plain(name: str, array: np.ndarray) -> np.ndarray:
    """``array``, which must not need a pickle to be read back (loading refuses pickles)."""
    if array.dtype.hasobject:
        raise TypeError(f"{name}: an object array would be pickled; the export stores plain arrays only")
    return array


def id_array(raw_ids) -> np.ndarray:
    """Raw ids as an array that needs no pickle to read: int64 for an integer id space, else
    fixed-width unicode of each id's canonical text (``data/ids.py``; integers past int64 are text).

    Args:
        raw_ids: the prepared data's raw ids (int64, or objects: text, or integers past int64).
    """
    array = np.asarray(raw_ids)
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    return np.asarray([canonical_id(value) for value in array.tolist()], dtype=str)


def _write_items(out: Path, model: TwoTower | Ensemble, data: PreparedData, batcher: Batcher,
                 cfg: ExportConfig) -> np.ndarray:
    """``item_embeddings.npy``, ``item_ids.npy``, ``items.parquet``; the ``[N, D]`` float32 embeddings."""
    with torch.no_grad():
        item_emb = catalog_embeddings(model.encode_items, batcher)[1:].numpy().astype(np.float32)
    _save_npy(out / "item_embeddings.npy", item_emb.astype(np.float16 if cfg.dtype == "float16" else np.float32))
    _save_npy(out / "item_ids.npy", id_array(data.raw_item_ids))
    with open(out / "items.parquet", "wb") as handle:
        data.item_metadata().drop(columns=["code"]).to_parquet(handle, index=False)
    return item_emb


def _write_users(out: Path, data: PreparedData) -> None:
    """``users.npz`` (raw ids, histories as CSR, side-feature codes) and ``vocabularies.json``."""
    user_arrays = {
        "raw_user_ids": id_array(data.raw_user_ids),
        "history_offsets": np.asarray(data.user_offsets),
        "history_items": np.asarray(data.item),
    }
    for name, column in data.user_features.items():
        user_arrays[f"feature_{name}"] = np.asarray(column)
    with open(out / "users.npz", "wb") as handle:
        np.savez(handle, **{name: _plain(name, array) for name, array in user_arrays.items()})
    _write_bytes(out / "vocabularies.json", json.dumps(data.spec.vocabularies, indent=2).encode())


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
        # hashed query features (data.hash_buckets) -> buckets: a raw value's code is 1 + hash % buckets
        "hashed": {name: int(buckets) for name, buckets in spec.hashed.items() if name in model.query_feature_order},
        "query_tower": {"file": "query_tower.pt2", "format": "torch.export",
                        "torchscript": "query_tower.pt" if cfg.torchscript else None},
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
