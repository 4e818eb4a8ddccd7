"""The served query tower: plain torch tables and the trained MLPs, TorchRec-free.

:func:`build_query_tower` copies an unsharded TwoTower's (or Ensemble's) query side into a
:class:`QueryTower` of codes -> embeddings, and :func:`export_program` turns it into a
``torch.export`` program (``query_tower.pt2``: batch size and value counts dynamic; loading it
needs only torch). Raw values are mapped to codes before the program, in plain Python, by
``serving/query_inputs.py``, which builds the history and recent-item inputs with the same
functions training batches use (:mod:`twotower_rec.data.query_inputs`).

Deprecated, for one release (``export.torchscript``): :class:`QueryEncoder`, the same tower with
its raw-value entry point compiled in, which ``torch.jit.script`` writes to ``query_tower.pt``.
Calling conventions are in ``export/__init__.py``.

Shapes: ``B`` rows, ``D`` one member's output dim, ``K`` members, ``N_f`` feature f's values.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram

from twotower_rec.data.features import HISTORY, Feature, fnv1a_finish, recent_position
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.query_inputs import item_before, last_items
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.transformer import TransformerPooling
from twotower_rec.model.two_tower import TwoTower


class FusedTransformerPooling(TransformerPooling):
    """:class:`TransformerPooling` whose layers run torch's fused encoder-layer operator, as eager
    evaluation runs them, so the exported program computes evaluation's queries bit for bit.

    In evaluation mode without gradients, ``nn.TransformerEncoderLayer`` takes a fast path, one
    fused operator per layer. ``torch.export`` traces with fake tensors, which the fast path's
    condition reads as tensors with torch functions, so a plain export records the unfused
    operators instead: the same function, with float32 results that differ from evaluation's in
    the last bits (up to 5e-7 in ``tests/test_query_tower_program.py``'s cases). This module
    calls the fused operator itself, with the float padding mask the layer makes of ``pad``; it
    is used only where eager evaluation takes the fast path (:func:`fused_like_eager`).
    """

    @classmethod
    def from_trained(cls, pooling: TransformerPooling) -> "FusedTransformerPooling":
        """A copy of ``pooling``'s weights in evaluation mode.

        Args:
            pooling: the trained transformer pooling.
        """
        first = pooling.encoder.layers[0]
        fused = cls(pooling.positions.embedding_dim, pooling.max_length, len(pooling.encoder.layers),
                    first.self_attn.num_heads, 0.0)
        fused.load_state_dict(pooling.state_dict())
        return fused.eval()

    def layers(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """As :meth:`TransformerPooling.layers`, through ``torch._transformer_encoder_layer_fwd``.

        Args:
            x: ``[B, T, E]`` each row's items with their position embeddings.
            pad: ``[B, T]`` bool, the slots attention ignores.
        """
        mask = torch.zeros_like(pad, dtype=x.dtype).masked_fill_(pad, float("-inf"))  # the layer's float mask
        for layer in self.encoder.layers:
            attention = layer.self_attn
            x = torch._transformer_encoder_layer_fwd(
                x, attention.embed_dim, attention.num_heads, attention.in_proj_weight, attention.in_proj_bias,
                attention.out_proj.weight, attention.out_proj.bias, layer.activation_relu_or_gelu == 2,
                layer.norm_first, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
                layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
                mask, 1)  # mask type 1: a [B, T] key padding mask
        return x


def fused_like_eager(pooling: TransformerPooling) -> bool:
    """Whether eager evaluation runs ``pooling``'s layers on torch's fast path: the conditions of
    ``nn.TransformerEncoderLayer.forward`` that vary for this module (the others hold by construction:
    batch first, biases, ReLU, one eps, post-norm).

    Args:
        pooling: the trained transformer pooling.
    """
    layer = pooling.encoder.layers[0]
    return (torch.backends.mha.get_fastpath_enabled() and layer.self_attn.num_heads % 2 == 0
            and not layer.norm_first and layer.activation_relu_or_gelu > 0 and layer.norm1.eps == layer.norm2.eps)


class MemberQueryEncoder(nn.Module):
    """One TwoTower's query tower with plain ``nn.EmbeddingBag`` tables: scriptable, TorchRec-free.

    ``forward(values, lengths)``: per feature, ``values[f]`` ``[sum(lengths[f])]`` int64 and
    ``lengths[f]`` ``[B]`` -> ``[B, D]`` L2-normalised query embeddings.
    """

    def __init__(self, weights: list[torch.Tensor], poolings: list[str], mlp: nn.Sequential,
                 sequence_table: torch.Tensor | None = None, sequence_pooling: nn.Module | None = None,
                 join_add: bool = False) -> None:
        """Copy the tables into frozen ``nn.EmbeddingBag`` modules; ``mlp`` and ``sequence_pooling`` are used as given.

        Args:
            weights: one ``[rows, E]`` table per pooled input, in input order (cloned).
            poolings: each table's pooling, ``"sum"`` or ``"mean"``.
            mlp: the query tower's MLP; its output is L2-normalised into the ``[B, D]`` embeddings.
            sequence_table: ``[V + 1, E]`` item table of a history encoder (``model.history_encoder=transformer``
                or ``causal``), which reads the last input; ``None``: every input is pooled.
            sequence_pooling: that history encoder, scriptable, ``(values [N, E], lengths [B]) -> [B, n * E]``;
                given with ``sequence_table``.
            join_add: sum the ``E``-wide inputs (``model.user_join=add``) instead of concatenating them.
        """
        super().__init__()
        self.join_add = join_add  # model.user_join=add: the inputs (E-wide parts) are summed, not concatenated
        self.dim = sequence_table.shape[1] if sequence_table is not None else 1
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag.from_pretrained(w, freeze=True, mode=p) for w, p in zip(weights, poolings)]
        )
        # model.history_encoder=transformer or causal: the last input is the history, read by the
        # sequence encoder (a list of zero or one, which TorchScript can loop over).
        self.sequence_tables = nn.ModuleList(
            [nn.Embedding.from_pretrained(sequence_table, freeze=True)] if sequence_table is not None else [])
        self.sequence_pooling = nn.ModuleList([sequence_pooling] if sequence_pooling is not None else [])
        self.mlp = mlp

    def forward(self, values: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        """Per query feature ``values[f]`` ``[sum(lengths[f])]`` and ``lengths[f]`` ``[B]`` -> ``[B, D]``."""
        pooled: List[torch.Tensor] = []
        last = 0
        for index, bag in enumerate(self.bags):
            counts = lengths[index].long()
            offsets = torch.cumsum(counts, 0) - counts
            pooled.append(bag(values[index].long(), offsets))
            last = index + 1
        for table in self.sequence_tables:
            for pooling in self.sequence_pooling:
                out = pooling(table(values[last].long()), lengths[last])  # [B, E] or [B, 2E] (history_mean)
                pooled.extend(out.split(self.dim, dim=1))
        joined = torch.stack(pooled).sum(0) if self.join_add else torch.cat(pooled, dim=1)
        return F.normalize(self.mlp(joined), dim=-1)


class QueryTower(nn.Module):
    """Codes -> ``[B, K * D]`` L2-normalised query embeddings: what ``query_tower.pt2`` computes.

    One :class:`MemberQueryEncoder` per model member; with K > 1 (``model.members``) their
    outputs are concatenated and divided by ``sqrt(K)``, as ``model/ensemble.py`` does.
    ``forward(values, lengths)``: one ``values[f]`` ``[N_f]`` int64 and ``lengths[f]`` ``[B]``
    int64 per query feature, in ``model.query_feature_order``.
    """

    def __init__(self, members: list[MemberQueryEncoder]) -> None:
        """Combine the member encoders.

        Args:
            members: one :class:`MemberQueryEncoder` per model member, all taking the same inputs.
        """
        super().__init__()
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / float(np.sqrt(len(members)))

    def forward(self, values: List[torch.Tensor], lengths: List[torch.Tensor]) -> torch.Tensor:
        """Codes per feature, ``values[f]`` ``[sum(lengths[f])]`` and ``lengths[f]`` ``[B]``, in
        query feature order -> ``[B, K * D]`` (see ``export/__init__.py``)."""
        parts: List[torch.Tensor] = []
        for member in self.members:
            parts.append(member(values, lengths))
        return torch.cat(parts, dim=1) * self.scale  # one member: scale 1, the member's own vectors


class QueryEncoder(QueryTower):
    """Deprecated (``export.torchscript``, ``query_tower.pt``): a :class:`QueryTower` whose
    raw-value entry point is compiled in with it by ``torch.jit.script``; the export's
    ``query_tower.pt2`` and ``serving/query_inputs.py`` replace it."""

    def __init__(self, members: list[MemberQueryEncoder], feature_names: list[str] | None = None,
                 vocabularies: dict[str, dict[str, int]] | None = None, history_length: int = 0,
                 hashed: dict[str, int] | None = None) -> None:
        """Combine the member encoders; without ``vocabularies`` only :meth:`forward` (codes) works.

        Args:
            members: one :class:`MemberQueryEncoder` per model member, all taking the same inputs.
            feature_names: the query features in input order (``model.query_feature_order``).
            vocabularies: per feature, raw value (a string) -> code (:func:`raw_vocabularies`), for ``encode_raw``.
            history_length: how many of a raw history's last items ``history`` keeps.
            hashed: hashed id feature (``data.hash_buckets``) -> its bucket count; :func:`hash_row` gives its codes.
        """
        super().__init__(members)
        # torch.jit.Attribute: the types TorchScript cannot infer from (possibly empty) containers
        self.feature_names = torch.jit.Attribute(list(feature_names or []), List[str])
        self.vocabularies = torch.jit.Attribute(dict(vocabularies or {}), Dict[str, Dict[str, int]])
        self.history_length = history_length
        # Hashed id features (data.hash_buckets) -> buckets: no vocabulary, the row is hash_row's.
        self.hashed = torch.jit.Attribute(dict(hashed or {}), Dict[str, int])
        self.recent = torch.jit.Attribute({n: recent_position(n) for n in feature_names or [] if recent_position(n)},
                                          Dict[str, int])

    @torch.jit.export
    def encode_raw(self, features: Dict[str, List[List[str]]]) -> torch.Tensor:
        """Raw values (strings), ``B`` rows per feature -> ``[B, K * D]``; see ``export/__init__.py``.

        Args:
            features: query feature name -> one list of raw values per row, ``B`` rows for every feature given;
                unknown values and features left out are the out-of-vocabulary bucket.
        """
        values, lengths = self.encode_inputs(features)
        return self.forward(values, lengths)

    @torch.jit.export
    def encode_inputs(self, features: Dict[str, List[List[str]]]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Raw values per feature and row -> the codes :meth:`forward` takes, one ``(values,
        lengths)`` pair per name in ``feature_names``. The history and recent items go through
        the same functions as training batches (``data/query_inputs.py``).

        Args:
            features: as :meth:`encode_raw` takes them; a feature left out is ``B`` empty rows.
        """
        batch = self._batch_size(features)
        values: List[torch.Tensor] = []
        lengths: List[torch.Tensor] = []
        for name in self.feature_names:
            rows: List[List[str]] = []
            if name in features:
                rows = features[name]
            else:
                for _ in range(batch):
                    missing: List[str] = []
                    rows.append(missing)
            vocab = self.vocabularies[name]
            if name == "history" or name in self.recent:
                sequence, starts, ends = self._sequences(rows, vocab)
                if name == "history":
                    value, length = last_items(sequence, starts, ends, self.history_length)
                else:  # recent_m takes the whole history; its m-th last item is used
                    value, length = item_before(sequence, starts, ends, self.recent[name]), torch.ones_like(ends)
            else:
                value, length = self._single(name, rows, vocab)
            values.append(value)
            lengths.append(length)
        return values, lengths

    def _batch_size(self, features: Dict[str, List[List[str]]]) -> int:
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
        return batch

    def _sequences(self, rows: List[List[str]],
                   vocab: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's item codes back to back (unknown ids: 0), with each row's [start, end)."""
        codes: List[int] = []
        counts: List[int] = []
        for row in rows:
            for value in row:
                codes.append(vocab.get(value, 0))
            counts.append(len(row))
        ends = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
        return torch.tensor(codes, dtype=torch.long), ends - torch.tensor(counts, dtype=torch.long), ends

    def _single(self, name: str, rows: List[List[str]], vocab: Dict[str, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """A single-valued feature's codes (missing or unknown: 0), one per row."""
        codes: List[int] = []
        for row in rows:
            if len(row) > 1:
                raise ValueError("feature '" + name + "' takes one value per row, got " + str(len(row)))
            if len(row) == 0:
                codes.append(0)
            elif name in self.hashed:
                codes.append(hash_row(row[0], self.hashed[name]))
            else:
                codes.append(vocab.get(row[0], 0))
        return torch.tensor(codes, dtype=torch.long), torch.ones(len(codes), dtype=torch.long)

@torch.jit.unused
def _eager_utf8(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def _utf8(text: str) -> List[int]:
    if torch.jit.is_scripting():
        return [ord(c) for c in text]  # TorchScript iterates a str's UTF-8 bytes
    return _eager_utf8(text)


def hash_row(text: str, buckets: int) -> int:
    """The row of a hashed raw id, ``1 + hash % buckets``: what ``features.hash_rows`` gives
    ``prepare`` for the same id, one string at a time (TorchScript).

    Args:
        text: the raw id as a string.
        buckets: the feature's number of hash buckets (``data.hash_buckets``).
    """
    h = 2166136261
    for byte in _utf8(text):
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return 1 + fnv1a_finish(h) % buckets


def raw_vocabularies(data: PreparedData, names: list[str]) -> dict[str, dict[str, int]]:
    """Raw value (as a string) -> code for every query feature (code 0: unknown). A user's raw
    id has a code only when the user had training events (``PreparedData.user_features``).

    Args:
        data: the prepared data.
        names: the query features; a hashed one (``data.hash_buckets``) gets an empty vocabulary.
    """
    out = {}
    for name in names:
        keep = None
        if name in data.spec.hashed:  # no vocabulary: QueryEncoder.hashed
            out[name] = {}
            continue
        if name == "user_id":
            raw, keep = data.raw_user_ids, data.user_features["user_id"][1:] > 0
        elif name == HISTORY or recent_position(name):
            raw = data.raw_item_ids
        else:
            raw = data.spec.vocabularies.get(name, [])
        values = np.asarray(raw, dtype=object).tolist()
        out[name] = {str(v.item() if isinstance(v, np.generic) else v): code
                     for code, v in enumerate(values, start=1) if keep is None or keep[code - 1]}
    return out


def _member_encoder(model: TwoTower, features: list[Feature], for_export: bool = False) -> MemberQueryEncoder:
    """Copy one unsharded TwoTower's query-side tables and query MLP; inputs follow
    ``model.query_feature_order``, and a history that shares the item tower's item-id table
    takes its weights from there. ``for_export``: a transformer history runs its layers as eager
    evaluation does (:class:`FusedTransformerPooling`)."""
    by_name = {f.name: f for f in features}
    item_tables = model.item_tower.embedding_bags.embedding_bags
    tables = {**item_tables, **(model.query_tower.embedding_bags.embedding_bags if model.query_tower.embedding_bags
                                else {})}
    names = list(model.query_feature_order)
    encoded = model.history.vectors > 0  # the last input is the history encoder's
    ordered = [by_name[name] for name in (names[:-1] if encoded else names)]
    weights = [tables[f.table].weight.detach() for f in ordered]
    sequence_table = sequence_pooling = None
    served = model.history.for_serving({name: bag.weight for name, bag in item_tables.items()})
    if served is not None:  # the history encoder's table and its scriptable module
        sequence_table, sequence_pooling = served[0], copy.deepcopy(served[1]).eval()
        if for_export and type(sequence_pooling) is TransformerPooling and fused_like_eager(sequence_pooling):
            sequence_pooling = FusedTransformerPooling.from_trained(sequence_pooling)
    return MemberQueryEncoder(weights, [f.pooling for f in ordered], model.query_tower.mlp, sequence_table,
                              sequence_pooling, model.query_tower.join == "add")


def build_query_encoder(model: TwoTower | Ensemble, features: list[Feature],
                        data: PreparedData | None = None) -> QueryEncoder:
    """A :class:`QueryEncoder` from an unsharded TwoTower (or Ensemble: one member encoder each).

    Args:
        model: the trained model, unsharded; its query-side tables are copied, its query MLPs used as they are.
        features: the query features (``FeatureSpec.query_features``): each one's table and pooling.
        data: the prepared data, for the raw-value vocabularies, the history length and the hash buckets;
            ``None``: an encoder of codes only (no ``encode_raw``).
    """
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    names = list(model.query_feature_order)
    vocabularies = raw_vocabularies(data, names) if data is not None else {}
    history_length = data.spec.history_length if data is not None else 0
    hashed = {n: b for n, b in data.spec.hashed.items() if n in names} if data is not None else {}
    encoders = [_member_encoder(m, features) for m in members]
    return QueryEncoder(encoders, names, vocabularies, history_length, hashed).eval()


def build_query_tower(model: TwoTower | Ensemble, features: list[Feature]) -> QueryTower:
    """A :class:`QueryTower` (codes -> embeddings) from an unsharded TwoTower (or Ensemble: one member encoder
    each), to export with :func:`export_program`.

    Args:
        model: the trained model, unsharded; its query-side tables are copied, its query MLPs used as they are.
        features: the query features (``FeatureSpec.query_features``): each one's table and pooling.
    """
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    return QueryTower([_member_encoder(m, features, for_export=True) for m in members]).eval()


EXAMPLE_ROWS = 3  # rows of the traced example: not 0 or 1, which torch.export would specialise on


def example_inputs(names: list[str], history_length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Codes to trace the tower with: :data:`EXAMPLE_ROWS` rows of the unknown code 0; the history has
    rows of different lengths (one empty), each at most ``history_length``; other features one value a row.

    Args:
        names: the query features, in input order.
        history_length: the most items a history row holds (``features.history_length``).
    """
    values, lengths = [], []
    for name in names:
        counts = [min(2, history_length), 0, min(3, history_length)] if name == HISTORY else [1] * EXAMPLE_ROWS
        lengths.append(torch.tensor(counts, dtype=torch.long))
        values.append(torch.zeros(sum(counts), dtype=torch.long))
    return values, lengths


def export_program(tower: QueryTower, names: list[str], history_length: int) -> ExportedProgram:
    """``tower`` as a ``torch.export`` program (``query_tower.pt2``): the batch size ``B`` (shared by
    every ``lengths[f]``) and each feature's value count ``N_f`` are dynamic, from 0 up.

    Args:
        tower: the query tower, in evaluation mode.
        names: the query features, in input order (one ``(values, lengths)`` pair each).
        history_length: the most items a history row holds (the traced example stays within it).
    """
    batch = Dim("batch")
    dynamic = ([(Dim(f"values_{index}"),) for index in range(len(names))], [(batch,)] * len(names))
    with torch.no_grad():
        return torch.export.export(tower, example_inputs(names, history_length), dynamic_shapes=dynamic)
