"""The spy of the tests that prove a stage reads no test data: every path opened inside a block."""
from __future__ import annotations

import builtins
import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def files_opened() -> Iterator[list[str]]:
    """Yield a list that receives the absolute path of every file opened with ``open`` (numpy,
    torch and PIL open through it) until the block ends."""
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.abspath(os.fspath(file)))
        return real_open(file, *args, **kwargs)

    builtins.open = spy
    try:
        yield opened
    finally:
        builtins.open = real_open
