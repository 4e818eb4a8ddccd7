"""What every reader returns: three tables in file order.

``RawData.interactions`` has columns ``user, item, timestamp, rating`` (one row per event,
in the order the source gives them: ties in time are broken by this order).
``RawData.users`` has ``user`` plus categorical side features; ``RawData.items`` has
``item``, ``genres`` (a list of strings), ``year`` (int, -1 unknown) and ``title``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
