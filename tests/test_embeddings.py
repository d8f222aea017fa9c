"""Class embeddings: the published files load in the right order, bad files are named, `vldus embed`."""
import json
import os

import numpy as np
import pytest

from vldus.data.embeddings import load_class_embeddings
from vldus.data.splits import load_split, split_from_names
from vldus.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CANDIDATES = ["/work/shared/data", os.path.join(REPO, "..", "shared", "data")]
SHARED = next((d for d in SHARED_CANDIDATES if os.path.isdir(d)), None)


def shared_file(rel: str) -> str:
    if SHARED is None or not os.path.isfile(os.path.join(SHARED, rel)):
        pytest.skip(f"published embedding file {rel} not available (looked in {SHARED_CANDIDATES})")
    return os.path.join(SHARED, rel)


def nearest(matrix: np.ndarray, split, name: str) -> str:
    """Nearest other class (cosine) of ``name`` among the class rows 1..C."""
    rows = matrix[1:] / np.linalg.norm(matrix[1:], axis=1, keepdims=True)
    sims = rows @ rows[split.index(name) - 1]
    sims[split.index(name) - 1] = -np.inf
    return split.classes[int(np.argmax(sims))]


# --- published files ----------------------------------------------------------------------
@pytest.mark.parametrize("rel,kwargs", [
    ("coco/fasttext.npy", {}),
    ("coco/word_w2v.npy", {}),
    ("coco/word_ftx.txt", {"background": "mean"}),   # 300 x 80 CSV, no background row
])
def test_coco_files_load_in_class_order(rel, kwargs):
    split = load_split("coco_65_15")
    matrix = load_class_embeddings(shared_file(rel), split, **kwargs)
    assert matrix.shape == (81, 300) and matrix.dtype == np.float32
    assert nearest(matrix, split, "cat") == "dog"
    assert nearest(matrix, split, "car") == "truck"
    assert np.isclose(np.linalg.norm(matrix.astype(np.float64), 2), 1.0, atol=1e-5)


def test_voc_fasttext_synonym_in_zsd_order():
    split = load_split("voc_16_4")
    matrix = load_class_embeddings(shared_file("voc/fasttext_synonym.npy"), split)
    assert matrix.shape == (21, 300)
    assert nearest(matrix, split, "cat") == "dog" and nearest(matrix, split, "dog") == "cat"


def test_spectral_norm_off_keeps_raw_values():
    path = shared_file("coco/word_w2v.npy")
    raw = np.load(path)
    matrix = load_class_embeddings(path, load_split("coco_65_15"), spectral_norm=False)
    assert matrix.dtype == np.float32
    np.testing.assert_allclose(matrix, raw.astype(np.float32))
    normed = load_class_embeddings(path, load_split("coco_65_15"))
    np.testing.assert_allclose(normed, raw / np.linalg.norm(raw, 2), rtol=1e-5, atol=1e-7)


def test_text_layout_background_rules():
    path = shared_file("coco/word_ftx.txt")
    split = load_split("coco_65_15")
    raw = np.loadtxt(path, delimiter=",").T
    zero = load_class_embeddings(path, split, spectral_norm=False, background="zero")
    mean = load_class_embeddings(path, split, spectral_norm=False, background="mean")
    np.testing.assert_allclose(zero[1:], raw, rtol=1e-6)
    assert not zero[0].any()
    np.testing.assert_allclose(mean[0], raw.mean(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match=r"word_ftx.txt.*80 rows.*81 rows.*background"):
        load_class_embeddings(path, split)


# --- bad input: every message names the file and the counts ---------------------------------
@pytest.fixture
def toy_split():
    return split_from_names("toy", ["circle", "square", "triangle"], unseen=["triangle"])


def test_wrong_row_count(tmp_path, toy_split):
    path = tmp_path / "se.npy"
    np.save(path, np.ones((5, 8), np.float32))
    with pytest.raises(InputError) as e:
        load_class_embeddings(path, toy_split)
    assert str(path) in str(e.value) and "5 rows" in str(e.value) and "4 rows" in str(e.value)


def test_nan_rows(tmp_path, toy_split):
    path = tmp_path / "se.npy"
    m = np.ones((4, 8))
    m[2, 3] = np.nan
    m[3, 0] = np.inf
    np.save(path, m)
    with pytest.raises(InputError, match=r"se.npy: 2 NaN/inf values in 2 rows \(first: row 2\)"):
        load_class_embeddings(path, toy_split)


def test_sidecar_order_mismatch(tmp_path, toy_split):
    path = tmp_path / "se.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, 8)))
    (tmp_path / "se.npy.json").write_text(json.dumps({"classes": ["circle", "triangle", "square"]}))
    with pytest.raises(InputError, match=r"se.npy.json: class order differs .* row 2: file has "
                                         r"'triangle', split has 'square'"):
        load_class_embeddings(path, toy_split)
    (tmp_path / "se.npy.json").write_text(json.dumps({"classes": ["circle", "square"]}))
    with pytest.raises(InputError, match=r"se.npy.json: 2 classes, split toy has 3"):
        load_class_embeddings(path, toy_split)
    (tmp_path / "se.npy.json").write_text(json.dumps({"classes": ["Circle", "square", "tri_angle"]}))
    assert load_class_embeddings(path, toy_split).shape == (4, 8)  # loose name match


@pytest.mark.parametrize("content,problem", [
    (None, "not found"),
    (b"garbage, not numpy", "cannot read"),
])
def test_missing_or_unreadable(tmp_path, toy_split, content, problem):
    path = tmp_path / "se.npy"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=f"se.npy: .*{problem}"):
        load_class_embeddings(path, toy_split)


def test_text_file_with_no_class_axis(tmp_path, toy_split):
    path = tmp_path / "att.txt"
    np.savetxt(path, np.ones((6, 7)), delimiter=",")
    with pytest.raises(InputError, match=r"att.txt: 6 lines x 7 columns"):
        load_class_embeddings(path, toy_split)


def test_all_zero_matrix(tmp_path, toy_split):
    path = tmp_path / "se.npy"
    np.save(path, np.zeros((4, 3)))
    with pytest.raises(InputError, match="se.npy: .*spectral norm"):
        load_class_embeddings(path, toy_split)
    assert not load_class_embeddings(path, toy_split, spectral_norm=False).any()
