"""Splits over time-sorted per-user sequences, and the leak-free history they imply.

Interactions are sorted by (user, timestamp, file order): ties in time keep file order.
``user_offsets[c - 1] : user_offsets[c]`` are the rows of user code ``c``. A row's history is
the rows of the same user *before* it, so it never contains the row itself or anything later.
"""

from __future__ import annotations

import numpy as np

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = {"train": TRAIN, "validation": VALIDATION, "test": TEST}


def split_name(split: int) -> str:
    """The name (``train``, ``validation`` or ``test``) of a split code.

    Args:
        split: :data:`TRAIN`, :data:`VALIDATION` or :data:`TEST`.
    """
    return {v: k for k, v in SPLIT_NAMES.items()}[split]


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Row order by user, then timestamp, then file position (a stable tie-break).

    Args:
        user: ``[R]`` each row's user (codes that sort like the users).
        timestamp: ``[R]`` each row's time.

    Returns:
        ``[R]`` row indices in that order.
    """
    return np.lexsort((np.arange(user.size), timestamp, user))


def offsets_from_sorted(user_code: np.ndarray, num_users: int) -> np.ndarray:
    """``[U + 1]`` start offsets of each user's rows; ``user_code`` is sorted and 1-based.

    Args:
        user_code: ``[R]`` each row's user code, sorted.
        num_users: ``U``, the number of user codes.
    """
    counts = np.bincount(user_code, minlength=num_users + 1)[1:]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def leave_last_out(user_offsets: np.ndarray) -> np.ndarray:
    """Per user: last row = test, second-last = validation, the rest train (SASRec protocol).

    Users need at least 3 rows; ``prepare`` drops the others first.

    Args:
        user_offsets: ``[U + 1]`` where each user's rows start.

    Returns:
        ``[R]`` int8 split code of each row.
    """
    split = np.full(int(user_offsets[-1]), TRAIN, dtype=np.int8)
    ends = user_offsets[1:]
    split[ends - 1] = TEST
    split[ends - 2] = VALIDATION
    return split


def temporal(timestamp: np.ndarray, file_position: np.ndarray, validation_fraction: float,
             test_fraction: float) -> np.ndarray:
    """Global time split: the latest ``test_fraction`` of all events (ties by file order) are test,
    the ``validation_fraction`` before them validation, the rest train.

    Args:
        timestamp: ``[R]`` each event's time.
        file_position: ``[R]`` each event's position in the source file (breaks ties in time).
        validation_fraction, test_fraction: shares of all events.

    Returns:
        ``[R]`` int8 split code of each event.
    """
    n = timestamp.size
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((file_position, timestamp))] = np.arange(n)
    return split_of_time_rank(rank, n, validation_fraction, test_fraction)


def split_of_time_rank(rank: np.ndarray, n: int, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """The temporal split of events whose place in the time order of all ``n`` is ``rank``.

    Args:
        rank: ``[N]`` each event's place, from 0, in the time order of all events (``N`` may be a
            chunk of them).
        n: the number of all events.
        validation_fraction, test_fraction: shares of all ``n`` events.

    Returns:
        ``[N]`` int8 split code of each event.
    """
    n_test = int(round(n * test_fraction))
    n_validation = int(round(n * validation_fraction))
    split = np.full(rank.size, TRAIN, dtype=np.int8)
    split[rank >= n - n_test - n_validation] = VALIDATION
    split[rank >= n - n_test] = TEST
    return split


def random_split(n: int, validation_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Each event independently: test with ``test_fraction``, validation with ``validation_fraction``.

    Args:
        n: the number of events.
        validation_fraction, test_fraction: each event's chance of being validation, and test.
        seed: the random generator's seed (``data.seed``).

    Returns:
        ``[n]`` int8 split code of each event.
    """
    return split_of_draw(np.random.default_rng(seed).random(n), validation_fraction, test_fraction)


def split_of_draw(draw: np.ndarray, validation_fraction: float, test_fraction: float) -> np.ndarray:
    """The random split of events given their uniform draws (in row order, from the seeded stream).

    Args:
        draw: ``[N]`` each event's uniform draw in ``[0, 1)``.
        validation_fraction, test_fraction: each event's chance of being validation, and test.

    Returns:
        ``[N]`` int8 split code of each event.
    """
    split = np.full(draw.size, TRAIN, dtype=np.int8)
    split[draw < test_fraction + validation_fraction] = VALIDATION
    split[draw < test_fraction] = TEST
    return split
