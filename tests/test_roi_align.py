"""The gather RoIAlign (vldus.detection.roi_align) against torchvision's MultiScaleRoIAlign:
same outputs and feature gradients, edge boxes included."""
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from vldus.detection.roi_align import GatherRoIAlign

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["0", "1", "2", "3"]


def pyramid(batch: int, channels: int, height: int, width: int, levels: int = 4, seed: int = 0) -> dict:
    """FPN-like maps at strides 4, 8, 16, 32 of a (height, width) padded batch."""
    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(batch, channels, -(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2)),
                                generator=g).requires_grad_()
            for i in range(levels)}


def random_boxes(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.9
    wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.6
    return torch.cat([xy, xy + wh], 1)


# boxes beyond the map, under one cell, on the last row/column, of zero size, partly negative;
# the last two put a sample exactly on the map's far edge (64.0 at stride 4) and on -1.0
EDGE_BOXES = torch.tensor([[229.0, 229.0, 257.0, 257.0], [-5.0, -5.0, 23.0, 23.0], [0.0, 0.0, 0.5, 0.5], [250.0, 250.0, 256.0, 256.0], [-20.0, -9.0, 40.0, 30.0],
                           [200.0, 10.0, 300.0, 120.0], [30.0, 30.0, 30.0, 30.0], [0.0, 0.0, 256.0, 256.0],
                           [3.3, 100.1, 3.9, 250.7], [255.0, 0.0, 400.0, 9.0], [-40.0, -40.0, -3.0, -2.0]])


def compare(features: dict, boxes: list, shapes: list, ratio: int, names=NAMES) -> None:
    ref_pool = MultiScaleRoIAlign(names, 7, ratio)
    ours = GatherRoIAlign(names, 7, ratio, kernel="gather")
    ref = ref_pool(features, boxes, shapes)
    got = ours(features, boxes, shapes)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if ref.numel():
        grad = torch.randn_like(ref)
        maps = [features[n] for n in names]
        for a, b in zip(torch.autograd.grad(got, maps, grad), torch.autograd.grad(ref, maps, grad)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_matches_torchvision_on_random_boxes(ratio):
    features = pyramid(2, 8, 256, 256)
    boxes = [random_boxes(40, 256, 256, seed=1), random_boxes(25, 256, 256, seed=2)]
    compare(features, boxes, [(256, 256)] * 2, ratio)


def test_matches_torchvision_on_edge_boxes():
    features = pyramid(2, 4, 256, 256, seed=3)
    compare(features, [EDGE_BOXES, EDGE_BOXES.flip(0) * 0.5], [(256, 256), (200, 240)], 2)


def test_matches_torchvision_on_a_padded_batch_of_two_sizes():
    """Images of different sizes in one padded batch (the scales come from the largest)."""
    features = pyramid(2, 4, 224, 320, seed=4)
    boxes = [random_boxes(30, 224, 320, seed=5), random_boxes(30, 160, 200, seed=6)]
    compare(features, boxes, [(224, 320), (160, 200)], 2)


def test_single_level_and_images_without_boxes():
    features = pyramid(2, 4, 128, 128, levels=1, seed=7)
    compare(features, [random_boxes(12, 128, 128, seed=8), torch.zeros(0, 4)], [(128, 128)] * 2, 2, names=["0"])
    compare(pyramid(2, 4, 128, 128, seed=9), [torch.zeros(0, 4), torch.zeros(0, 4)], [(128, 128)] * 2, 2)


def test_kernel_choice_and_bf16():
    features = pyramid(1, 4, 128, 128, seed=10)
    boxes = [random_boxes(10, 128, 128, seed=11)]
    assert GatherRoIAlign(NAMES, 7, 2).uses_gather(torch.device("cpu"))  # auto: gather on a CPU
    assert not GatherRoIAlign(NAMES, 7, 2).uses_gather(torch.device("cuda"))
    assert not GatherRoIAlign(NAMES, 7, 0).uses_gather(torch.device("cpu"))  # adaptive ratio: torchvision's
    tv = GatherRoIAlign(NAMES, 7, 2, kernel="torchvision")(features, boxes, [(128, 128)])
    assert torch.equal(tv, MultiScaleRoIAlign(NAMES, 7, 2)(features, boxes, [(128, 128)]))
    half = {k: v.detach().bfloat16() for k, v in features.items()}
    got = GatherRoIAlign(NAMES, 7, 2, kernel="gather")(half, boxes, [(128, 128)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), tv.detach(), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError):
        GatherRoIAlign(NAMES, 7, 0, kernel="gather")
    with pytest.raises(ValueError):
        GatherRoIAlign(NAMES, 7, 2, kernel="fast")
