"""The training transform: timm's recipe in [0, 1] pixel space."""

import numpy as np
import torch
from PIL import Image

from gnr.config import RunConfig
from gnr.data.transforms import seeded, train_transform


def photo(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def recipe(**augment) -> RunConfig:
    return RunConfig.model_validate({"data": {"img_size": 32}, "augment": augment})


def test_randaugment_at_full_magnitude_survives_zero_bit_posterize():
    transform = train_transform(recipe(auto_augment="rand-m10-n3-inc1"))  # Posterize keeps 0 bits at m10
    for seed in range(200):
        with seeded(seed):
            assert transform(photo()).shape == (3, 32, 32)


def test_random_erasing_fills_with_noise_of_the_data_scale_clamped_to_pixels():
    transform = train_transform(recipe(auto_augment=None, color_jitter=0.0, reprob=1.0, scale=(1.0, 1.0), hflip=0.0))
    grey = Image.new("RGB", (32, 32), (124, 116, 104))  # the ImageNet mean colour
    with seeded(0):
        erased = transform(grey)
    assert 0.0 <= erased.min() and erased.max() <= 1.0
    noisy = erased[(erased - torch.tensor([124, 116, 104]).view(3, 1, 1) / 255).abs() > 1e-3]
    assert 0.35 < noisy.mean() < 0.55 and 0.15 < noisy.std() < 0.3  # mean + std * N(0, 1), not N(0, 1)


def test_the_same_seed_gives_the_same_augmentation():
    transform = train_transform(recipe())
    with seeded(3):
        first = transform(photo())
    with seeded(3):
        again = transform(photo())
    with seeded(4):
        other = transform(photo())
    assert torch.equal(first, again) and not torch.equal(first, other)
