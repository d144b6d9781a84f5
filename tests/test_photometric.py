"""Photometric augmentation batched on the training device against torchvision's per-view uint8
operations (the loader workers' reference): the same parameters must give the same pixels, up to float
rounding at integer boundaries; and the device mode keeps every view's geometry."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from glsd_cli.data import photometric as P
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.data.synthetic import SyntheticTextures

CPU = torch.device("cpu")


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random uint8 images (large flat areas and gradients, like photographs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def _params(n: int, seed: int, **force) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([P.draw(g, 224, 0.5, 0.5) for _ in range(n)], dtype=torch.float32)
    for name, value in force.items():
        p[:, getattr(P, name.upper())] = value
    return p


def _reference(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return torch.stack([P.apply_on_host(v, p.tolist()) for v, p in zip(views, params)]).float()


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_operation_equals_torchvision(op):
    views = _images(48, 24, 0)
    index = ["brightness", "contrast", "saturation", "hue"].index(op)
    params = _params(48, 1, jitter=1, gray=0, blur=0, solarize=0)
    params[:, P.ORDER] = torch.tensor([index, 0, 1, 2]).float()  # this operation first, then three others
    got = P.DevicePhotometric(CPU)._photometric(views.float(), params)
    diff = (got - _reference(views, params)).abs()
    assert (diff == 0).float().mean() > 0.999 and diff.max() <= 4


def test_the_whole_recipe_equals_torchvision_pixel_for_pixel():
    views = _images(96, 32, 2)
    params = _params(96, 3)
    # The fixture exercises every operation and order.
    assert params[:, P.JITTER].any() and params[:, P.GRAY].any() and params[:, P.BLUR].any() and params[:, P.SOLARIZE].any()
    assert len({tuple(o) for o in params[:, P.ORDER].tolist()}) > 10
    got = P.DevicePhotometric(CPU)._photometric(views.float(), params)
    diff = (got - _reference(views, params)).abs()
    assert (diff == 0).float().mean() > 0.9995 and diff.max() <= 1


def test_blur_with_per_image_sigma_and_off_is_identity():
    views = _images(16, 32, 4)
    params = _params(16, 5, jitter=0, gray=0, solarize=0)
    params[:, P.BLUR] = torch.arange(16) % 2  # every other image blurred, with its own σ
    got = P.DevicePhotometric(CPU)._photometric(views.float(), params)
    assert torch.equal(got[0::2], views[0::2].float())  # unblurred images untouched
    diff = (got - _reference(views, params)).abs()
    assert (diff == 0).float().mean() > 0.999 and diff.max() <= 1


def test_device_mode_gives_the_workers_views_and_the_same_geometry():
    source = SyntheticTextures("train", 8, size=40)
    crop = MultiCrop(32, 16, 3)
    workers = default_collate([ViewsDataset(source, crop, seed=7)[i] for i in range(8)])
    device_items = default_collate([ViewsDataset(source, crop, seed=7, photometric_on_device=True)[i] for i in range(8)])
    assert all(v.dtype == torch.uint8 for v in device_items["views"])
    assert torch.equal(workers["boxes"], device_items["boxes"]) and torch.equal(workers["flips"], device_items["flips"])
    finished = P.DevicePhotometric(CPU).prepare(device_items)
    assert "photometric" not in finished
    for a, b in zip(workers["views"], finished["views"]):
        assert a.shape == b.shape and b.dtype == torch.float32
        # one uint8 level, normalised: 1 / 255 / std
        assert (a - b).abs().max() <= 1 / 255 / min(P.IMAGENET_STD) + 1e-5
        assert torch.isclose(a, b, atol=1e-5).float().mean() > 0.999


def test_without_colour_only_normalisation_runs():
    source = SyntheticTextures("train", 4, size=40)
    crop = MultiCrop(32, 16, 2, color=False)
    workers = default_collate([ViewsDataset(source, crop, seed=0)[i] for i in range(4)])
    device_items = default_collate([ViewsDataset(source, crop, seed=0, photometric_on_device=True)[i] for i in range(4)])
    finished = P.DevicePhotometric(CPU, color=False).prepare(device_items)
    for a, b in zip(workers["views"], finished["views"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
