"""Image files: the one decoder used by training, extraction, testing and the API."""
from __future__ import annotations

import numpy as np
import torch

from vldus.errors import InputError


def _open_error(path: str, e: Exception) -> InputError:
    if isinstance(e, FileNotFoundError):
        return InputError(path, "image file not found")
    reason = (str(e).strip().splitlines() or [""])[0]
    return InputError(path, f"cannot read image ({type(e).__name__}{': ' + reason if reason else ''})")


# what PIL raises for a file it cannot open or decode
_PIL_ERRORS = (OSError, ValueError, SyntaxError)


def read_rgb(path: str) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB; InputError naming the file when it is missing or
    cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_readable(path: str) -> None:
    """InputError unless PIL can open ``path`` as an image (reads the header only: cheap)."""
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from None


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in 0..1, the detector's input."""
    return image.float().div_(255.0)
