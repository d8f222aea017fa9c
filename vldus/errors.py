"""One exception type for bad user input.

Anything the user handed us that is wrong (a missing file, a malformed annotation, an unknown
class name, a shape mismatch) raises :class:`InputError`. The CLI turns it into ONE line on
stderr and exit code 2; library users catch it like any other exception.
"""
from __future__ import annotations

import os


class InputError(Exception):
    """Bad input. ``str(err)`` is the whole one-line message: ``<file>: <item>: <problem>``."""

    def __init__(self, source: str | os.PathLike | None, message: str):
        self.source = None if source is None else str(source)
        self.message = message
        super().__init__(f"{self.source}: {message}" if self.source else message)


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` as str if it is an existing file, else raise InputError naming it."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, f"{what} not found")
    return path
