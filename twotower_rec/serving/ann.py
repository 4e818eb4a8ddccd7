"""Approximate nearest-neighbour index over the item embeddings (faiss, inner product).

The towers emit L2-normalised vectors and training scores ``q . i``, so every index uses
``METRIC_INNER_PRODUCT``: the exact (``flat``) index ranks items exactly as evaluation does;
``hnsw`` and ``ivf`` trade a measured amount of recall for speed on large catalogs.
:func:`recall_against_exact` is what ``export`` writes into the manifest.

faiss is imported lazily, so the rest of the package works without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from twotower_rec.errors import AnnError

KINDS = ("flat", "hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
        raise AnnError("the ANN index needs faiss: pip install faiss-cpu (or set export.ann=none)") from None
    return faiss


@dataclass
class AnnParams:
    kind: str = "hnsw"
    hnsw_m: int = 32  # graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128  # candidates explored per query
    ivf_nlist: int = 0  # clusters; 0: 4 * sqrt(items)
    ivf_nprobe: int = 16  # clusters searched per query


def build_index(vectors: np.ndarray, params: AnnParams):
    """A faiss index over ``vectors`` ``[N, D]`` float32 (row r = id r)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if params.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.hnsw.efSearch = params.hnsw_ef_search
    elif params.kind == "ivf":
        nlist = params.ivf_nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(params.ivf_nprobe, nlist)
    else:
        raise AnnError(f"unknown index kind '{params.kind}': use one of {list(KINDS)}")
    index.add(vectors)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) ``[Q, k]``; rows are -1 where the index returned fewer than k."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_against_exact(index, vectors: np.ndarray, queries: np.ndarray, ks: tuple[int, ...] = (10, 100),
                         chunk_scores: int = 1 << 24) -> dict:
    """recall@k of ``index`` against exact inner-product search: the share of the exact top-k
    that the index's top-k contains, averaged over ``queries``. Exact scores are computed for
    a block of queries at a time (about ``chunk_scores`` scores), so memory stays bounded at
    any catalog size."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    block = max(1, chunk_scores // max(vectors.shape[0], 1))
    hits = {k: 0 for k in ks}
    for lo in range(0, len(queries), block):
        part = queries[lo:lo + block]
        neg_scores = -(part @ vectors.T)
        for k in ks:
            kk = min(k, vectors.shape[0])
            exact = np.argpartition(neg_scores, kk - 1, axis=1)[:, :kk]
            _, found = search(index, part, kk)
            hits[k] += sum(len(set(e.tolist()) & set(f.tolist())) for e, f in zip(exact, found))
    return {f"recall@{k}": float(hits[k] / (min(k, vectors.shape[0]) * len(queries))) for k in ks}


def write(index, path) -> None:
    _faiss().write_index(index, str(path))


def read(path, params: dict | None = None):
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise AnnError(f"{path}: not a readable faiss index ({str(err).splitlines()[0][:200]})") from None
    params = params or {}
    if "hnsw_ef_search" in params and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params["hnsw_ef_search"])
    if "ivf_nprobe" in params and hasattr(index, "nprobe"):
        index.nprobe = int(params["ivf_nprobe"])
    return index


def timed_build(vectors: np.ndarray, params: AnnParams):
    started = time.perf_counter()
    index = build_index(vectors, params)
    return index, time.perf_counter() - started
