"""Re-keying KeyedJaggedTensors for a tower's collection: the model's own KJT utilities.

The batches (``data/batches.py``) build one query KJT and one item KJT per batch; a tower's
EmbeddingBagCollection expects exactly its own features, so a table shared between towers or
read by a history encoder is looked up through these. Callers register them with
``torch.fx.wrap`` in their own module: TorchRec's train pipeline traces the model with
torch.fx, which cannot iterate a KJT's keys, so a wrapped call is one leaf of the trace.

Shapes: ``B`` rows, ``T`` slots.
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor


def with_keys(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    """The same ``B`` rows with exactly ``keys`` in that order; keys ``features`` lacks get no ids.

    Lets a tower's EmbeddingBagCollection, which expects all of its features, be called with
    only some of them (a table shared between towers is looked up once per tower's rows).

    Args:
        features: a KJT of ``B`` rows.
        keys: the keys of the result, in order.
    """
    present = features.to_dict()
    counts = dict(zip(features.keys(), features.length_per_key()))  # cached by the batches: no host sync
    rows = features.stride()
    values, lengths = [], []
    for key in keys:
        if key in present:
            values.append(present[key].values())
            lengths.append(present[key].lengths())
        else:
            lengths.append(torch.zeros(rows, dtype=features.lengths().dtype, device=features.device()))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else features.values().new_zeros(0),
        lengths=torch.cat(lengths),
        length_per_key=[counts.get(key, 0) for key in keys],
    )


def slot_kjt(history: JaggedTensor, slots: int, keys: list[str], key: str) -> KeyedJaggedTensor:
    """``B`` jagged rows of at most ``slots`` ids -> a KJT of ``B * slots`` bags of one id or
    none (row b's t-th id in bag ``b * slots + t``) under ``key``, the other ``keys`` empty.

    Lets a pooled EmbeddingBagCollection look ids up one by one in a fixed layout: with every
    rank's rows of the same count, every rank passes the same number of bags.

    Args:
        history: ``B`` rows of ids.
        slots: ``T``, at least the longest row.
        keys: the collection's feature names (the result's keys).
        key: the one of ``keys`` that gets the ids.
    """
    lengths = history.lengths()
    rows = lengths.shape[0]
    per_slot = (torch.arange(slots, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)).reshape(-1)
    empty = torch.zeros(rows * slots, dtype=lengths.dtype, device=lengths.device)
    ids = history.values().shape[0]  # every id lands in a bag: known without reading the lengths
    return KeyedJaggedTensor(keys=keys, values=history.values(),
                             lengths=torch.cat([per_slot.to(lengths.dtype) if k == key else empty for k in keys]),
                             length_per_key=[ids if k == key else 0 for k in keys])
