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


def _device_batches(n_batches: int, seed: int = 3) -> list[dict]:
    source = SyntheticTextures("train", 4 * n_batches, size=40)
    crop = MultiCrop(32, 16, 2)
    data = ViewsDataset(source, crop, seed=seed, photometric_on_device=True)
    return [default_collate([data[4 * b + i] for i in range(4)]) for b in range(n_batches)]


def test_prepared_batches_gives_each_batch_prepared_in_order():
    from glsd_cli.engine.batching import PreparedBatches

    batches = _device_batches(3)
    photometric = P.DevicePhotometric(CPU)
    asked = []

    def prepare(batch):
        asked.append(batch)
        return photometric.prepare(batch)

    prepared = PreparedBatches(iter(batches), prepare, CPU)
    got = []
    for batch in prepared:
        prepared.prepare_next()  # as the Trainer does inside a step: nothing runs ahead on the CPU
        got.append(batch)
        assert len(asked) == len(got)
    assert [a is b for a, b in zip(asked, batches)] == [True] * 3
    for g, b in zip(got, batches):
        for x, y in zip(g["views"], photometric.prepare(b)["views"]):
            assert torch.equal(x, y)
        assert torch.equal(g["boxes"], b["boxes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by bench/gpu_session.sh)")
def test_prepared_batches_on_a_side_stream_equal_preparing_inline_while_steps_run():
    """Each batch prepared on the side stream, one ahead (launched mid-'step', as the Trainer does),
    while the default stream is busy with a 'step' that allocates and overwrites memory: the views are
    those of inline preparation (the stream waits for its batch, and the allocator does not reuse a
    batch's memory under the step)."""
    from glsd_cli.engine.batching import PreparedBatches

    cuda = torch.device("cuda")
    batches = _device_batches(6)
    photometric = P.DevicePhotometric(cuda)
    want = [[v.cpu() for v in photometric.prepare(b)["views"]] for b in batches]
    prepared = PreparedBatches(iter(batches), photometric.prepare, cuda)
    got = 0
    for batch, expected in zip(prepared, want):
        noise = torch.randn(4096, 4096, device=cuda)
        for _ in range(8):  # a long kernel queue on the default stream
            noise = noise @ noise / 64
        prepared.prepare_next()
        views = [v.clone() for v in batch["views"]]
        del noise
        got += 1
        for v, e in zip(views, expected):
            torch.testing.assert_close(v.cpu(), e, rtol=0, atol=1e-5)
    assert got == len(batches)
