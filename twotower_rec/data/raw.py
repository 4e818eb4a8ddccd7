"""What every reader returns: three tables in file order.

``RawData.interactions`` has columns ``user, item, timestamp, rating`` (one row per event,
in the order the source gives them: ties in time are broken by this order).
``RawData.users`` has ``user`` plus categorical side features; ``RawData.items`` has
``item``, ``genres`` (a list of strings), ``year`` (int, -1 unknown) and ``title``.
User and item ids follow the one id rule (``ids.py``): each id space is int64 when every id in
every file that names it is an integer, else canonical text, so the tables join on equal ids.
A directory of Parquet files is not read here: ``interactions_files`` lists them (in name
order, the file order) for the out-of-core ``prepare``, and ``interactions`` is left empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class RawData:
    """The tables one reader returns (their columns: the module docstring).

    Args:
        interactions: the events, ``user, item, timestamp, rating``, in the source's order; empty
            when ``interactions_files`` is set.
        users: ``user`` plus categorical side features.
        items: ``item``, ``genres``, ``year`` and ``title`` (those the source has).
        name: where the interactions came from, for messages (and ``FeatureSpec.source``).
        users_name, items_name: where the user and item tables came from, for messages.
        has_ratings: False when the source had no rating column (every rating reads 1.0).
        interactions_files: the Parquet files the out-of-core ``prepare`` reads instead of
            ``interactions``, in name order; None: ``interactions`` holds the events.
    """

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    name: str  # for messages: where the interactions came from
    users_name: str = "users table"
    items_name: str = "items table"
    has_ratings: bool = True  # False: the source had no rating column (every rating reads 1.0)
    interactions_files: list[Path] | None = None  # Parquet files read out of core instead of ``interactions``
