"""vldus.files: whole-or-nothing writes and file hashes."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from vldus.files import atomic_write, save_npy, save_torch, sha256_file, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    write_json(str(path), {"v": 1})

    def half_write(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": ')
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), half_write)
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("indent", [None, 1, 2])
def test_write_json_round_trip_and_creates_folders(tmp_path, indent):
    path = tmp_path / "a" / "b" / "m.json"
    obj = {"x": [1, 2.5, None], "s": "é"}
    write_json(str(path), obj, indent=indent)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=indent)


def test_save_npy_and_torch(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_npy(str(tmp_path / "a.npy"), a)
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]  # no '.npy' appended to a temporary name
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)
    save_torch({"w": torch.ones(2)}, str(tmp_path / "c.pth"))
    assert torch.equal(torch.load(tmp_path / "c.pth", weights_only=True)["w"], torch.ones(2))


@pytest.mark.parametrize("size", [0, 5, (1 << 20) + 3])
def test_sha256_file(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(tmp_path / "f"), chunk=7) == hashlib.sha256(data).hexdigest()
