"""The sharded feature writer: finished vs unfinished shards, chunked merge in shard order."""
import os

import numpy as np
import pytest

from vldus.detection.shards import ShardStore, merge_shards, shard_ranges

DIM = 6


def rows(n, start):
    feats = (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + start * 100)
    return feats, np.arange(start, start + n, dtype=np.int64)


def write(store, i, *blocks, commit=True):
    with store.writer(i) as w:
        for n, start in blocks:
            w.append(*rows(n, start))
        if commit:
            w.commit({"items": len(blocks)})


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_merge_concatenates_in_shard_order(tmp_path, chunk_rows):
    store = ShardStore(str(tmp_path / "parts"), DIM)
    store.reset({"run": 1})
    write(store, 1, (4, 10))
    write(store, 0, (2, 0), (3, 2))  # written second, merged first
    write(store, 2)  # an empty shard
    feats_path, labels_path = str(tmp_path / "f.npy"), str(tmp_path / "l.npy")
    assert merge_shards(store, range(3), feats_path, labels_path, chunk_rows=chunk_rows) == 9
    feats, labels = np.load(feats_path), np.load(labels_path)
    expect = [rows(2, 0), rows(3, 2), rows(4, 10)]
    assert np.array_equal(feats, np.concatenate([e[0] for e in expect]))
    assert np.array_equal(labels, np.concatenate([e[1] for e in expect]))
    assert feats.dtype == np.float32 and labels.dtype == np.int64
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert isinstance(np.load(feats_path, mmap_mode="r"), np.memmap)  # a plain .npy file


def test_unfinished_and_damaged_shards_are_pending(tmp_path):
    store = ShardStore(str(tmp_path / "parts"), DIM)
    store.reset({"run": 1})
    write(store, 0, (2, 0))
    write(store, 1, (2, 0), commit=False)  # killed before its marker
    write(store, 2, (3, 0))
    with open(store.feats_file(2), "r+b") as f:  # truncated data behind a marker
        f.truncate(10)
    assert store.pending(4) == [1, 2, 3]
    assert store.finished(0) == {"items": 1, "rows": 2}
    write(store, 1, (1, 5))  # rewritten from scratch
    assert store.finished(1)["rows"] == 1 and store.read(1)[1].tolist() == [5]


def test_reset_drops_old_parts_and_keeps_run_info(tmp_path):
    store = ShardStore(str(tmp_path / "parts"), DIM)
    store.reset({"seed": 1})
    write(store, 0, (2, 0))
    store.reset({"seed": 2})
    assert store.run_info() == {"seed": 2} and store.pending(1) == [0]


def test_append_checks_shapes(tmp_path):
    store = ShardStore(str(tmp_path / "parts"), DIM)
    store.reset({})
    with store.writer(0) as w, pytest.raises(ValueError):
        w.append(np.zeros((2, DIM + 1), np.float32), np.zeros(2, np.int64))


def test_shard_ranges():
    assert shard_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert shard_ranges(0, 3) == []
