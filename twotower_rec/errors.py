"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""


class TwoTowerError(ValueError):
    """Base of every user-facing error: the message names the file, row or key and the fix."""
