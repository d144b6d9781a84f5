import torch

from glsd_cli.data.multicrop import MultiCrop, random_resized_crop_box, sample_generator
from glsd_cli.data.synthetic import CLASSES, MIN_CONTRAST, SyntheticTextures


def test_views_sizes_boxes_and_flips():
    mc = MultiCrop(32, 16, num_local=3)
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    views, boxes, flips = mc(img, sample_generator(0, 0, 0))
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16]
    assert boxes.shape == (5, 4) and flips.shape == (5,) and flips.dtype == torch.bool
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 50).all()


def test_randomness_is_a_function_of_seed_epoch_index():
    mc = MultiCrop(16, 8, num_local=2)
    img = SyntheticTextures("train", 4, size=24)[1][0]
    a = mc(img, sample_generator(3, 1, 7))
    b = mc(img, sample_generator(3, 1, 7))
    c = mc(img, sample_generator(3, 2, 7))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_colour_switch_keeps_geometry():
    img = SyntheticTextures("train", 2, size=24)[0][0]
    with_color = MultiCrop(16, 8, 2, color=True)(img, sample_generator(0, 0, 5))
    no_color = MultiCrop(16, 8, 2, color=False)(img, sample_generator(0, 0, 5))
    assert torch.equal(with_color[1], no_color[1]) and torch.equal(with_color[2], no_color[2])


def test_crop_area_within_scale():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(100, 100, (0.1, 0.3), gen)
        assert 0.1 * 1e4 * 0.9 <= h * w <= 0.3 * 1e4 * 1.1


def test_synthetic_is_deterministic_and_balanced():
    a, b = SyntheticTextures("train", 30), SyntheticTextures("train", 30)
    assert torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], SyntheticTextures("val", 30)[5][0])
    assert sorted(set(a.targets)) == list(range(10)) and a.targets.count(0) == 3


def test_synthetic_images_are_grey_textures_with_contrast():
    # Grey levels (no colour for self-distillation to match views by) with two phases at least
    # MIN_CONTRAST apart (up to the pixel noise), every class present in a split of ten images.
    source = SyntheticTextures("val", 10)
    assert source.classes == CLASSES and len(set(CLASSES)) == 10
    for i in range(10):
        img = source[i][0].float() / 255
        assert img.shape == (3, 32, 32)
        assert (img.max(0).values - img.min(0).values).mean() < 0.15  # channels differ by noise only
        grey = img.mean(0).flatten()
        low, high = grey.quantile(0.05), grey.quantile(0.95)
        assert high - low > MIN_CONTRAST - 0.1, (CLASSES[source[i][1]], float(high - low))
