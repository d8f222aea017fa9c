"""benchmarks/profile_detector.py: forward and backward time charged to the right module."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from profile_detector import ModuleRanges, charge, exclusive, profiled  # noqa: E402


def test_backward_ops_are_charged_to_the_module_that_made_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 1))
    x = torch.randn(256, 8)
    ranges = ModuleRanges(model, (("small", "0"), ("big", "2"), ("head", "3")))

    def step():
        with torch.profiler.record_function("forward"):
            loss = model(x).square().mean()
        with torch.profiler.record_function("backward"):
            loss.backward()

    forward, backward = charge(profiled(step, torch.device("cpu")), {"small", "big", "head", "forward", "backward"},
                               cuda=False)
    ranges.remove()
    assert {"small", "big", "head"} <= set(forward) and forward["forward"] >= forward["big"] > 0
    # each Linear's AddmmBackward / MmBackward is charged to its own range, never to "backward"
    assert {"small", "big", "head"} <= set(backward) and "backward" not in backward
    assert backward["big"] > backward["head"]  # 512x512 weight gradient against 512x1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model)  # removed


def test_containing_ranges_become_the_rest():
    times = {"RPN": 10.0, "RPN head": 4.0, "RoI heads": 9.0, "RoIAlign": 2.0, "box head": 3.0, "backbone": 7.0}
    out = exclusive(times)
    assert out["RPN rest (anchors, proposals, NMS, losses)"] == 6.0
    assert out["RoI heads rest (sampling, losses)"] == 4.0
    assert "RPN" not in out and "RoI heads" not in out and out["backbone"] == 7.0
    backward = exclusive({"RPN": 3.0, "RPN head": 4.0}, nested=False)  # already innermost: renamed only
    assert backward == {"RPN rest (anchors, proposals, NMS, losses)": 3.0, "RPN head": 4.0}
