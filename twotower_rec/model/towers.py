"""Tower: sparse features (KJT) + dense features -> L2-normalised embedding.

Shapes: ``B`` batch, ``F`` tables, ``E`` embedding dim per table, ``Dd`` dense features,
``D`` output dim. ``forward``: KJT (B rows) + ``[B, Dd]`` -> ``[B, D]``.

Tables are built on the ``meta`` device: nothing is allocated until the
DistributedModelParallel wrapper in ``distributed/sharding.py`` places and materialises them.
This file holds no distributed code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.data.features import Feature

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(features: list[Feature], embedding_dim: int) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table, in first-use order; features naming the same table share it.

    Args:
        features: the sparse features; those sharing a table must agree on its size and pooling.
        embedding_dim: ``E``, every table's columns.
    """
    by_table: dict[str, list[Feature]] = {}
    for f in features:
        by_table.setdefault(f.table, []).append(f)
    configs = []
    for table, users in by_table.items():
        if len({(f.num_embeddings, f.pooling) for f in users}) > 1:
            raise ValueError(f"features {[f.name for f in users]} share {table} but differ in size or pooling")
        configs.append(EmbeddingBagConfig(
            name=table,
            embedding_dim=embedding_dim,
            num_embeddings=users[0].num_embeddings,
            feature_names=[f.name for f in users],
            pooling=_POOLING[users[0].pooling],
        ))
    return configs


def mlp(in_dim: int, hidden: list[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) per hidden size, then a linear projection to ``out_dim``.

    Args:
        in_dim: the input width.
        hidden: the hidden layers' widths, in order (empty: the projection alone).
        out_dim: the output width.
        dropout: after each hidden ReLU; 0 adds no Dropout layer.
    """
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """EmbeddingBagCollection -> concat with dense -> MLP -> projection -> L2 normalisation.

    ``features`` feed this tower's MLP; ``lent_features`` are looked up in this tower's tables
    on behalf of the other tower (they join the collection but not this MLP).

    Example::

        tower = Tower([Feature("user_id", "query", 10)], embedding_dim=8, dense_dim=0,
                      mlp_dims=[16], output_dim=4, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor(keys=["user_id"], values=torch.tensor([1, 2]),
                                lengths=torch.tensor([1, 1]))
        tower(kjt, torch.zeros(2, 0)).shape  # torch.Size([2, 4])
    """

    def __init__(
        self,
        features: list[Feature],
        embedding_dim: int,
        dense_dim: int,
        mlp_dims: list[int],
        output_dim: int,
        dropout: float = 0.0,
        device: torch.device | None = None,
        lent_features: list[Feature] | None = None,
        join: str = "concat",
    ) -> None:
        """Args:
            features: the features of this tower's MLP, pooled in this order.
            embedding_dim: ``E``.
            dense_dim: ``Dd``, the dense input's width.
            mlp_dims: the MLP's hidden widths (``model.mlp_dims``).
            output_dim: ``D`` (``model.output_dim``).
            dropout: after each hidden layer (``model.dropout``).
            device: where the tables are built (``meta`` by default: sharding materialises them).
            lent_features: features looked up in this tower's tables for the other tower (not this MLP's).
            join: ``concat`` puts the pooled features and the dense input side by side; ``add`` sums them
                (the MLP's input is then ``E`` wide).
        """
        super().__init__()
        self.feature_names = [f.name for f in features]
        configs = table_configs(features + list(lent_features or []), embedding_dim)
        self.collection_feature_names = [name for c in configs for name in c.feature_names]
        # A query tower without features of its own (the causal encoder's state is its whole input,
        # features.user_features=[]) has no collection.
        self.embedding_bags = (EmbeddingBagCollection(tables=configs, device=device or torch.device("meta"))
                               if configs else None)
        # join add: the pooled features and the dense input (then E wide) are summed, not concatenated
        self.join, self.embedding_dim = join, embedding_dim
        in_dim = embedding_dim if join == "add" else embedding_dim * len(features) + dense_dim
        self.mlp = mlp(in_dim, mlp_dims, output_dim, dropout)

    def pool(self, features: KeyedJaggedTensor | None, names: list[str]) -> list[torch.Tensor]:
        """Pooled ``[B, E]`` embeddings of ``names``, in that order.

        A sharded collection may return features grouped differently (e.g. by pooling type)
        from an unsharded one: columns are picked by name so every placement agrees.

        Args:
            features: a KJT of the collection's features (None only when ``names`` is empty).
            names: the features to return, in order.
        """
        if not names:
            return []
        by_name = self.embedding_bags(features).to_dict()
        return [by_name[name] for name in names]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F * E + Dd]`` (join add: ``[B, E]``) -> ``[B, D]``: the MLP, then L2 normalisation.

        Args:
            x: the MLP's input (:meth:`joined`); its rows may be positions instead of rows of the batch.
        """
        return F.normalize(self.mlp(x), dim=-1)

    def joined(self, pooled: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """F x ``[B, E]`` pooled features and ``[B, Dd]`` dense -> the MLP's input: side by side,
        or (join add, ``Dd`` a multiple of E) the sum of the features and of dense's E-wide parts.

        Args:
            pooled: F x ``[B, E]`` the pooled features (:meth:`pool`).
            dense: ``[B, Dd]`` the dense input.
        """
        if self.join == "add":
            return torch.stack([*pooled, *dense.split(self.embedding_dim, dim=1)]).sum(0)
        return torch.cat([*pooled, dense], dim=1)

    def forward(self, features: KeyedJaggedTensor | None, dense: torch.Tensor) -> torch.Tensor:
        """KJT (B rows, the collection's features) + ``[B, Dd]`` dense -> ``[B, D]``, rows of norm 1."""
        return self.head(self.joined(self.pool(features, self.feature_names), dense))
