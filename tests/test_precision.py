"""gan.precision: fp32 by default in every bundled config, bf16 only when asked for."""
import glob
import os

import pytest
import torch

from vldus import precision as prec
from vldus.config import GanConfig, load_config
from vldus.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_configs_default_to_fp32(name):
    assert load_config(name).gan.precision == "fp32"


def test_dataclass_default_is_fp32():
    assert GanConfig().precision == "fp32"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_explicit_precisions_ignore_the_cpu(monkeypatch, has_bf16):
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: has_bf16)
    assert prec.resolve_precision("fp32", "cpu") == "fp32"
    assert prec.resolve_precision("bf16", "cpu") == "bf16"
    assert prec.resolve_precision("auto", "cpu") == ("bf16" if has_bf16 else "fp32")


def test_unknown_precision_is_refused():
    with pytest.raises(InputError, match="gan.precision: 'fp16': expected one of fp32, bf16, auto"):
        prec.resolve_precision("fp16", torch.device("cpu"))
