"""scikit-learn's 8x8 digits as 16x16 training images for the digits DiT.

The 1797 images are split once, by a fixed permutation, into a training set and a held-out set,
so that training and the tests measure loss on disjoint images. Pixels are scaled from the
data set's 0..16 to [-1, 1] (the range the model works in) and upscaled bilinearly to 16x16,
which gives smooth strokes and 64 tokens per image at patch size 2.
"""

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
HELD_OUT = 197
SPLIT_SEED = 0


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 16, 16] in [-1, 1] and labels [N] (long) of split "train" or "held_out"."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen = order[HELD_OUT:] if split == "train" else order[:HELD_OUT]
    return images[chosen], labels[chosen]
