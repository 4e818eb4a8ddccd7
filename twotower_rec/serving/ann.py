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
    """Which faiss index to build, and its parameters.

    Args:
        kind: ``flat`` (exact), ``hnsw`` or ``ivf``.
        hnsw_m: the HNSW graph degree.
        hnsw_ef_construction: HNSW candidates explored per added vector.
        hnsw_ef_search: HNSW candidates explored per query.
        ivf_nlist: IVF clusters; ``0``: about ``4 * sqrt(N)``, at most ``N / 39``.
        ivf_nprobe: IVF clusters searched per query (at most ``ivf_nlist``).
    """

    kind: str = "hnsw"
    hnsw_m: int = 32  # graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128  # candidates explored per query
    ivf_nlist: int = 0  # clusters; 0: 4 * sqrt(items)
    ivf_nprobe: int = 16  # clusters searched per query


def build_index(vectors: np.ndarray, params: AnnParams):
    """A faiss index over ``vectors`` ``[N, D]`` float32 (row r = id r).

    Args:
        vectors: ``[N, D]`` item embeddings (cast to float32).
        params: the index kind and its parameters.
    """
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
    """(scores, rows) ``[Q, k]``; rows are -1 where the index returned fewer than k.

    Args:
        index: a faiss index (:func:`build_index`, :func:`read`).
        queries: ``[Q, D]`` query embeddings (cast to float32).
        k: results per query; clipped to the index's size.
    """
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_against_exact(index, vectors: np.ndarray, queries: np.ndarray, ks: tuple[int, ...] = (10, 100),
                         chunk_scores: int = 1 << 24) -> dict:
    """recall@k of ``index`` against exact inner-product search: the share of the exact top-k
    that the index's top-k contains, averaged over ``queries``.

    Args:
        index: the index to measure, built over ``vectors``.
        vectors: ``[N, D]`` the vectors the index holds (row r = id r).
        queries: ``[Q, D]`` query embeddings.
        ks: the cut-offs ``k``; each clipped to ``N``.
        chunk_scores: about how many exact scores are computed at a time (a block of queries), so memory stays
            bounded at any catalog size.

    Returns:
        ``{"recall@k": share}`` for each ``k`` in ``ks``.
    """
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
    """Write ``index`` to a file, through Python's file I/O (a full disk is an ``OSError``).

    Args:
        index: a faiss index.
        path: the file to write.
    """
    data = _faiss().serialize_index(index)
    with open(path, "wb") as handle:
        handle.write(data.data)  # the array's buffer, not a copy


def read(path, params: dict | None = None):
    """The faiss index in the file ``path`` (``AnnError`` if it is not one), with its search settings.

    Args:
        path: a file :func:`write` wrote.
        params: the manifest's ``ann.params``: ``hnsw_ef_search`` and ``ivf_nprobe`` are set on an index of that
            kind, the rest is ignored; ``None``: the settings saved with the index.
    """
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
    """:func:`build_index`, timed: ``(index, seconds)``.

    Args:
        vectors: ``[N, D]`` item embeddings.
        params: the index kind and its parameters.
    """
    started = time.perf_counter()
    index = build_index(vectors, params)
    return index, time.perf_counter() - started
