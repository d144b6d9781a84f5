"""Training images for classifiers on a frozen or fine-tuned backbone, augmented reproducibly.

Each item's augmentation is a function of (seed, epoch, index) through `multicrop.sample_generator`
(docs/design.md principle 2), so runs repeat exactly whatever the number of loader workers.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from glsd_cli.data.base import ImageSource
from glsd_cli.data.loader import SeededEpochDataset
from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, random_resized_crop_box, sample_generator

# torchvision's RandomResizedCrop default scale, used by DINO's eval_linear.py and DeiT.
CROP_SCALE = (0.08, 1.0)
# RandAugment strength: torchvision spreads `magnitude` over `num_magnitude_bins - 1` steps, timm over
# 10 (its "m9" is 9/10 of each operation's maximum). 11 bins make magnitude 9 mean the same 9/10.
RANDAUG_BINS = 11
RANDAUG_OPS = 2  # operations per image (timm's and torchvision's default n = 2)


class AugmentedImages(SeededEpochDataset):
    """Item i of epoch e → {'image', 'label', 'index'}.

    augment=True:  RandomResizedCrop(size, scale min_crop_scale–1; the protocols' 0.08 by default) +
                   horizontal flip p=0.5 (DINO's linear protocol), then RandAugment when
                   `randaugment_magnitude` is set (DeiT fine-tuning). Tiny images (16–32 px) keep
                   little of an 8% crop: a larger `min_crop_scale` suits them.
    augment=False: the evaluation transform (resize 256/224, centre crop) — the images whose frozen
                   features the cached linear mode trains on.
    """

    def __init__(self, source: ImageSource, size: int, seed: int, augment: bool = True,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 randaugment_magnitude: int | None = None, min_crop_scale: float = CROP_SCALE[0]):
        super().__init__(source, seed)
        self.size, self.augment = size, augment
        self.crop_scale = (min_crop_scale, CROP_SCALE[1])
        self.interpolation = interpolation
        self.eval_transform = EvalTransform(size)
        # RandAugment's rotate/shear/translate: bilinear, the best torchvision's tensor kernels offer.
        self.randaugment = (v2.RandAugment(RANDAUG_OPS, randaugment_magnitude, RANDAUG_BINS,
                                           InterpolationMode.BILINEAR) if randaugment_magnitude is not None else None)

    def __getitem__(self, index: int) -> dict:
        image, label = self.source[index]
        if not self.augment:
            return {"image": self.eval_transform(image), "label": label, "index": index}
        gen = sample_generator(self.seed, self.epoch, index)
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], self.crop_scale, gen)
        view = F.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=self.interpolation,
                              antialias=True)
        if float(torch.rand((), generator=gen)) < 0.5:
            view = F.horizontal_flip(view)
        if self.randaugment is not None:
            # torchvision's RandAugment draws from the global RNG: seed it from this sample's
            # generator inside a forked RNG so the global stream is left as it was.
            sample_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                view = self.randaugment(view)
        image_out = F.normalize(view.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        return {"image": image_out, "label": label, "index": index}
