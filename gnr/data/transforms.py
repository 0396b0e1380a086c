"""Image transforms producing float pixels in [0, 1]: timm's training recipe and the standard eval crop.

Normalisation lives inside the model, because attacks and gradient penalties work in pixel space.
The training transform is still timm's, built with ImageNet mean/std, and un-normalised at the end:
that keeps the recipe's semantics exactly (RandAugment fills with the mean colour, pixel-mode random
erasing draws noise of the data's scale, i.e. mean + std * N(0, 1) per pixel) instead of black fill
and unit-variance noise, and the final clamp puts erased pixels back into the valid [0, 1] range.
"""

from __future__ import annotations

import io
import math
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms as T
from torchvision.transforms.functional import pil_modes_mapping

from gnr.config import RunConfig

Transform = Callable[[Image.Image], torch.Tensor]


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes lazily: the header is parsed, pixels are decoded on first use."""
    return Image.open(io.BytesIO(data))


def train_transform(cfg: RunConfig) -> Transform:
    """timm's `create_transform(is_training=True)` from ``cfg.augment``, with a draft-decoding crop."""
    a = cfg.augment
    pipeline = create_transform(
        cfg.data.img_size, is_training=True, scale=tuple(a.scale), hflip=a.hflip, auto_augment=a.auto_augment,
        color_jitter=a.color_jitter or None, re_prob=a.reprob, re_mode=a.remode, interpolation=a.interpolation,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    crop = pipeline.transforms[0]
    assert isinstance(crop, RandomResizedCropAndInterpolation), pipeline
    pipeline.transforms[0] = DraftRandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio,
                                                    interpolation=a.interpolation)
    pipeline.transforms.append(ToPixels(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    for op in _augment_ops(pipeline.transforms):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return pipeline


def _augment_ops(transforms: list) -> Iterator[auto_augment.AugmentOp]:
    """The ops of RandAugment / AugMix (``ops``) and AutoAugment (``policy``: lists of ops)."""
    for t in transforms:
        yield from getattr(t, "ops", ())
        for sub_policy in getattr(t, "policy", ()):
            yield from sub_policy


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, including its 0-bit case (an all-black image), which Pillow 13 rejects.

    RandAugment ``m9-mstd0.5`` reaches magnitude 10 in 2.3% of draws, where PosterizeIncreasing keeps
    0 bits: about one batch of 64 in ten would crash with "bits must be between or equal to 1 and 8".
    AutoAugment's v0 policy asks for 0 bits too."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def eval_transform(cfg: RunConfig) -> Transform:
    """RGB image -> resize the shorter side to ``data.eval_resize``, centre-crop ``data.img_size``, [0, 1]."""
    return T.Compose([
        T.Resize(cfg.data.eval_resize, interpolation=str_to_interp_mode(cfg.augment.interpolation)),
        T.CenterCrop(cfg.data.img_size),
        T.ToTensor(),
    ])


class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop that lets libjpeg decode a not-yet-loaded JPEG at 1/2, 1/4 or 1/8 scale.

    The crop box is drawn exactly as timm draws it (same random calls, on the full-size geometry);
    the image is then decoded at the smallest DCT scale that still gives the box at least the output
    resolution, and the box, rescaled to that resolution, is resized to the output size. Same crops,
    far fewer decoded pixels when the crop is large. Loaded images (and PNGs) are cropped as usual.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, height, width = self.get_params(img, self.scale, self.ratio)
        interpolation = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) \
            else self.interpolation
        full_w, full_h = img.size
        out_h, out_w = self.size
        drafted = img.draft(None, (math.ceil(full_w * out_w / width), math.ceil(full_h * out_h / height)))
        scale = drafted[1][2] / full_w if drafted else 1.0  # draft reports the decoded extent in its units
        box = tuple(v * scale for v in (left, top, left + width, top + height))
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert() of an RGB image copies it whole
        return rgb.resize((out_w, out_h), pil_modes_mapping[interpolation], box=box)


class ToPixels:
    """Undo the normalisation of a timm transform and clamp to the valid pixel range [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.std + self.mean).clamp_(0.0, 1.0)


@contextmanager
def seeded(seed: int, *, restore: bool = True) -> Iterator[None]:
    """Seed python's, numpy's and torch's (CPU) global RNGs for a block; restore them afterwards.

    timm and torchvision transforms draw from all three. Seeding them per sample makes a sample's
    augmentation a function of its position in the stream, so a resumed epoch can skip samples
    without decoding them. Restoring keeps the caller's own random streams untouched; a DataLoader
    worker owns its RNGs and skips it (saving numpy's state alone costs ~0.1 ms a sample).
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
