"""vldus.data.images: the one image decoder (uint8 RGB, errors naming the file)."""
import numpy as np
import pytest
import torch
from PIL import Image

from vldus.data.images import check_readable, read_rgb, to_float
from vldus.errors import InputError


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_read_rgb_gives_uint8_3hw(tmp_path, mode):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = str(tmp_path / "im.png")
    Image.fromarray(pixels).convert(mode).save(path)
    image = read_rgb(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(image.numpy(), expected)
    if mode == "RGB":
        assert np.array_equal(image.numpy(), pixels.transpose(2, 0, 1))
    check_readable(path)
    f = to_float(image)
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1
    assert torch.allclose(f * 255, image.float())


@pytest.mark.parametrize("reader", [read_rgb, check_readable])
@pytest.mark.parametrize("content,problem", [(None, "image file not found"),
                                             (b"not an image", "cannot read image (UnidentifiedImageError")])
def test_bad_files_name_the_file(tmp_path, reader, content, problem):
    path = tmp_path / "broken.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as e:
        reader(str(path))
    assert str(e.value).startswith(f"{path}: {problem}")
    assert len(str(e.value).splitlines()) == 1


def test_truncated_file_is_an_input_error(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 77).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match="cannot read image"):
        read_rgb(str(path))
