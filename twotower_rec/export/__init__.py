"""Export what a serving system needs, from a checkpoint and its prepared data.

``writer.py`` writes the directory below; ``query_encoder.py`` builds the query tower in it.
``twotower_rec/serving/`` reads it back (``serving/manifest.py`` defines the format).

The export directory (written beside it and swapped in, ``twotower_rec/atomic.py``; ``export``
replaces only an earlier export, or an empty or missing folder, and a write that fails, a full
disk or a read-only folder, is an ``ExportError`` that leaves the earlier export whole). No file
needs a pickle to be read: arrays are numbers or fixed-width unicode, loaded with
``allow_pickle=False``, and the query tower's archive stores its tensors as raw bytes::

    manifest.json          format version (5), versions, dims, metric, dtype, query feature order,
                           history length, hashed query features (name -> buckets), files with
                           their sizes and SHA-256s, ANN recall, data fingerprint, evaluation
                           metrics (eval_<split>.json only when it scored this checkpoint: its
                           "checkpoint" entry names it)
    item_embeddings.npy    [N, D] float32 (or float16 with export.dtype), L2-normalised;
                           row r is raw item id item_ids[r]
    item_ids.npy           [N] raw item ids: int64 (an integer id space) or unicode (text ids)
    items.parquet          raw id, title, genres (where the data has them)
    items.faiss            ANN index over item_embeddings (export.ann: flat | hnsw | ivf)
    query_tower.pt2        the query tower of codes, a torch.export program (torch.export.load;
                           no TorchRec, nor this package, needed to load or call it)
    query_tower.pt         only with export.torchscript=true (deprecated, one release): the same
                           tower as TorchScript, raw-value entry point compiled in
    users.npz              known users: raw ids (as item_ids.npy), side-feature codes (feature_user_id: 0 for a
                           user without training events), interaction history (item codes,
                           time order, CSR) so `recommend --user` needs nothing else
    vocabularies.json      small categorical vocabularies (feature -> raw values; code = index + 1)

Calling ``query_tower.pt2`` (only torch is needed)::

    program = torch.export.load("export/query_tower.pt2").module()
    embeddings = program(values, lengths)          # [B, D] float32, L2-normalised

- ``values``: a list with one int64 tensor ``[N_f]`` per name in ``manifest["query_features"]``,
  in that order: the rows' codes back to back (0 = unknown). ``lengths``: a list with one
  int64 tensor ``[B]`` per name, each row's count of values (``sum(lengths[f]) == N_f``).
  ``B`` (from 1) and every ``N_f`` (from 0) may be any size: the program was exported with
  dynamic shapes. Single-valued features have one value a row (0 when unknown); ``history``
  at most ``manifest["history_length"]`` a row (0 to that many, oldest first); ``recent_m``
  one a row.
- Codes from raw values (``twotower_rec/serving/query_inputs.py``, plain Python and torch,
  does this with the export's files): an item id is ``row + 1`` of ``item_ids.npy`` (0 when
  not there); ``history`` keeps each row's last ``history_length`` item codes, ``recent_m``
  its m-th last (0 when it has fewer), both computed over the whole raw history;
  ``user_id`` is ``users.npz`` ``feature_user_id`` at the user's row of ``raw_user_ids`` + 1;
  another side feature is index + 1 of its value in ``vocabularies.json``; a hashed feature
  (``manifest["hashed"]``) is ``1 + hash(id) % buckets`` (``data/features.py``, ``hash_rows``).
  Raw ids follow ``data/ids.py`` (``"007"`` is ``7`` in an integer id space). A feature left
  out, and an unknown value, is code 0: a new user is ``user_id`` left out.

In this package, ``ExportedModel.query_tower`` is the program behind that pre-processing:
``query_tower(values, lengths)``, and ``query_tower.encode_raw(features)`` on raw values as
strings, one list per row, e.g. ``{"user_id": [["42"]], "gender": [["M"]], "history": [["1",
"50", "260"]]}`` (``encode_inputs(features)`` returns the codes).

The query embedding's dot product with ``item_embeddings`` rows is the model's score. For an
ensemble (``model.members`` = K > 1) both are the K members' embeddings side by side, divided
by ``sqrt(K)``, so the score is the mean of the members' cosines.
"""
