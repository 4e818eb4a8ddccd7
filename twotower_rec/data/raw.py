"""What every reader returns: three tables in file order.

``RawData.interactions`` has columns ``user, item, timestamp, rating`` (one row per event,
in the order the source gives them: ties in time are broken by this order).
``RawData.users`` has ``user`` plus categorical side features; ``RawData.items`` has
``item``, ``genres`` (a list of strings), ``year`` (int, -1 unknown) and ``title``.
A directory of Parquet files is not read here: ``interactions_files`` lists them (in name
order, the file order) for the out-of-core ``prepare``, and ``interactions`` is left empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class RawData:
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    name: str  # for messages: where the interactions came from
    users_name: str = "users table"
    items_name: str = "items table"
    has_ratings: bool = True  # False: the source had no rating column (every rating reads 1.0)
    interactions_files: list[Path] | None = None  # Parquet files read out of core instead of ``interactions``
