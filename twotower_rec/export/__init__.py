"""Export what a serving system needs, from a checkpoint and its prepared data.

``writer.py`` writes the directory below; ``query_encoder.py`` is the TorchScript query tower in
it. ``twotower_rec/serving/`` reads it back (``serving/manifest.py`` defines the format).

The export directory (written beside it and swapped in, ``twotower_rec/atomic.py``; ``export``
replaces only an earlier export, or an empty or missing folder, and a write that fails, a full
disk or a read-only folder, is an ``ExportError`` that leaves the earlier export whole). No file
needs a pickle to be read: arrays are numbers or fixed-width unicode, loaded with
``allow_pickle=False``::

    manifest.json          format version, versions, dims, metric, dtype, feature order, files
                           with their sizes and SHA-256s, ANN recall, data fingerprint,
                           evaluation metrics (eval_<split>.json only when it scored this
                           checkpoint: its "checkpoint" entry names it)
    item_embeddings.npy    [N, D] float32 (or float16 with export.dtype), L2-normalised;
                           row r is raw item id item_ids[r]
    item_ids.npy           [N] raw item ids: int64 (an integer id space) or unicode (text ids)
    items.parquet          raw id, title, genres (where the data has them)
    items.faiss            ANN index over item_embeddings (export.ann: flat | hnsw | ivf)
    query_tower.pt         TorchScript QueryEncoder (no TorchRec needed to load or call it)
    users.npz              known users: raw ids (as item_ids.npy), side-feature codes (feature_user_id: 0 for a
                           user without training events), interaction history (item codes,
                           time order, CSR) so `recommend --user` needs nothing else
    vocabularies.json      small categorical vocabularies (feature -> raw values; code = index + 1)

Calling ``query_tower.pt`` (``torch.jit.load``; only torch is needed):

- ``encode_raw(features: Dict[str, List[List[str]]]) -> Tensor[B, D]``: raw values as
  strings, one list per row, for the names in ``manifest["query_features"]``, e.g.
  ``{"user_id": [["42"]], "gender": [["M"]], "history": [["1", "50", "260"]]}``. Single-valued
  features take one value per row (side features take the values listed in
  vocabularies.json); ``history`` takes the raw ids of the items the user interacted with,
  oldest first (the last ``history_length`` are used), and so does each ``recent_m`` (its
  m-th last item is used). Unknown values, and features left out, are the out-of-vocabulary
  bucket: a new user is ``user_id`` left out.
- ``encode_inputs(features)`` with the same argument returns the codes ``forward`` takes.
- ``forward(values: List[Tensor], lengths: List[Tensor]) -> Tensor[B, D]``: the same on
  encoded ids, one (values, lengths) pair per name in ``manifest["query_features"]``, in that
  order; values are int64 codes (0 = unknown), lengths per-row counts. Item codes are
  ``row + 1`` of ``item_ids.npy``.

The query embedding's dot product with ``item_embeddings`` rows is the model's score. For an
ensemble (``model.members`` = K > 1) both are the K members' embeddings side by side, divided
by ``sqrt(K)``, so the score is the mean of the members' cosines.
"""
