"""``query_tower.pt2`` pieces that need no trained model: the transformer history's fused layers, and
the streamed save (``export/pt2.py``).

Eager evaluation runs ``nn.TransformerEncoderLayer`` on torch's fast path (one fused operator a
layer); ``torch.export`` would record the unfused operators, whose float32 results differ in the
last bits. :class:`FusedTransformerPooling` calls the fused operator itself, so the exported
program computes what eager evaluation does, bit for bit, at any batch size.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from twotower_rec.export.query_encoder import FusedTransformerPooling, fused_like_eager
from twotower_rec.model.transformer import TransformerPooling


def _history(lengths: list[int], dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), dim, generator=generator), torch.tensor(lengths, dtype=torch.long)


@pytest.mark.parametrize("layers, heads", [(1, 2), (2, 4)])
def test_the_exported_transformer_history_equals_eager_evaluation_bit_for_bit(layers, heads):
    torch.manual_seed(0)
    trained = TransformerPooling(dim=8, max_length=5, layers=layers, heads=heads, dropout=0.1).eval()
    assert fused_like_eager(trained)
    fused = FusedTransformerPooling.from_trained(trained)
    with torch.no_grad():
        program = torch.export.export(fused, _history([2, 0, 3], 8, seed=1),
                                      dynamic_shapes=((Dim("values"), Dim.STATIC), (Dim("batch"),))).module()
        for seed, lengths in enumerate([[4], [0, 5], [1, 2, 3, 4, 5, 0, 1], [0] * 4]):  # batch sizes 1, 2, 7, 4
            values, counts = _history(lengths, 8, seed)
            eager = trained(values, counts)
            assert torch.equal(fused(values, counts), eager)
            assert torch.equal(program(values, counts), eager), lengths


def test_odd_head_counts_keep_the_unfused_layers():
    """Eager evaluation leaves the fast path for an odd number of heads: so does the export."""
    trained = TransformerPooling(dim=9, max_length=4, layers=1, heads=3, dropout=0.0).eval()
    assert not fused_like_eager(trained)


class _Lookup(torch.nn.Module):
    """An embedding-bag table (a parameter) and a bias (a buffer): the two kinds of weight a tower saves."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(50, 4))
        self.register_buffer("bias", torch.randn(4))

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding_bag(values, self.table, offsets) + self.bias


def test_save_program_writes_the_archive_torch_export_save_writes(tmp_path):
    """The streamed save is the same file, byte for byte, and loads to the same outputs; without
    the stream the weights would go through two in-memory copies each (see export/pt2.py)."""
    from twotower_rec.export.pt2 import save_program

    torch.manual_seed(0)
    values, offsets = torch.tensor([1, 7, 49, 3]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        program = torch.export.export(_Lookup(), (values, offsets), dynamic_shapes=((Dim("n"),), (Dim("b"),)))
    with open(tmp_path / "streamed.pt2", "wb") as handle:
        save_program(program, handle)
    with open(tmp_path / "torch.pt2", "wb") as handle:
        torch.export.save(program, handle)
    assert (tmp_path / "streamed.pt2").read_bytes() == (tmp_path / "torch.pt2").read_bytes()
    loaded = torch.export.load(tmp_path / "streamed.pt2").module()
    assert torch.equal(loaded(values, offsets), program.module()(values, offsets))
    from torch.export.pt2_archive import _package  # the hooks are put back

    assert _package.PT2ArchiveWriter.write_bytes.__module__ == _package.__name__
