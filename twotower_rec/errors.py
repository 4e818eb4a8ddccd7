"""Errors a user can fix, all in one place. The CLI prints their message on one line and exits
with status 2; the HTTP server answers 4xx with it.

Each names what went wrong where: the file and line, the config key, the checkpoint or export
directory, and the fix.
"""

import difflib


def closest(name: str, options: list[str], prefix: str = "") -> str:
    """``"; did you mean '...'?"`` naming the option nearest to ``name`` (or "").

    Args:
        name: the misspelt name.
        options: the valid names; "" only when there are none.
        prefix: written before the match, e.g. the section of a dotted key (``train.``).
    """
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


class TwoTowerError(ValueError):
    """Base of every user-facing error: the message names the file, row or key and the fix."""


class ConfigError(TwoTowerError):
    """A config file or override is wrong; the message names the key and the fix."""


class DataError(TwoTowerError):
    """Input data is missing or malformed; the message names the file, row and problem."""


class CheckpointError(TwoTowerError):
    """A checkpoint is missing, incomplete or does not match the data it is used with."""


class ExportError(TwoTowerError):
    """An export is missing, incomplete or inconsistent, or a request cannot be answered."""


class UnknownUserError(ExportError):
    """A raw user id that is not in the export (HTTP 404 rather than 400)."""


class AnnError(TwoTowerError):
    """The ANN index cannot be built or read."""


class TrainingError(TwoTowerError):
    """Training cannot go on (e.g. the loss became infinite or NaN); the message names the step."""


class ConfigDocError(TwoTowerError):
    """An option of a config dataclass has no help (or keeps it in a comment), so the configuration
    reference cannot be written; the message names the file, the line and the field."""


class ConfigWarning(UserWarning):
    """An option is set where nothing reads it (the CLI prints it as one ``warning:`` line)."""


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` (of option ``key``) is one of ``choices``.

    Args:
        key: the dotted option name the message names.
        value: its value.
        choices: the valid values.
    """
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {list(choices)}{closest(value, list(choices))}")
