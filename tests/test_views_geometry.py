"""The real augmentation pipeline records geometry that matches what the pixels show."""
import pytest
import torch

from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, sample_generator
from glsd_cli.geometry import token_centres


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """Red = row index, green = column index: every pixel shows its own coordinates (≤ 255)."""
    ys = torch.arange(height).view(-1, 1).expand(height, width)
    xs = torch.arange(width).view(1, -1).expand(height, width)
    return torch.stack([ys, xs, torch.zeros_like(xs)]).to(torch.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_token_centres_match_pixel_coordinates(seed):
    image = coordinate_image(180, 240)
    crop = MultiCrop(64, 32, num_local=4, color=False)
    patch = 8
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seen_flip = seen_plain = False
    for index in range(12):
        views, boxes, flips = crop(image, sample_generator(seed, 0, index))
        for view, box, flip in zip(views, boxes, flips):
            side = view.shape[-1] // patch
            pixels = (view * std + mean) * 255
            # The mean of a linear ramp over a token's cell is its value at the cell centre; pixel k
            # holds value k and covers [k, k + 1), so the value at coordinate y is y - 0.5.
            shown = pixels[:2].reshape(2, side, patch, side, patch).mean((2, 4)).reshape(2, -1).T
            recorded = token_centres(box[None], flip[None], (side, side))[0]
            err = (shown - (recorded - 0.5)).abs().max().item()
            assert err <= 0.75, f"view of box {box.tolist()} flipped={bool(flip)}: {err:.2f} px off"
            seen_flip |= bool(flip)
            seen_plain |= not bool(flip)
    assert seen_flip and seen_plain
