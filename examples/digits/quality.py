"""Sanity numbers for generated digits: do they look like the asked class, and like real digits?

Both compare images in [0, 1] (the range `sample` returns) with the real images of the training
split, by L2 distance to the nearest one (cheap, deterministic, no fitting):
* `class_accuracy`: the share of images whose nearest training image has the class they were
  generated for. Real held-out digits score 0.99.
* `nearest_distance`: the mean distance to that nearest image; samples should be about as far as
  real held-out digits are (much nearer means copies, much farther means noise).
"""

import torch

from .data import load_digits


def _nearest_training_image(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and label of, the nearest training image for each image [N, 1, H, W] in [0, 1]."""
    real, real_labels = load_digits("train")
    distances = torch.cdist(images.flatten(1).float().cpu(), (real.flatten(1) + 1.0) / 2.0)
    nearest = distances.min(dim=1)
    return nearest.values, real_labels[nearest.indices]


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images [N, 1, H, W] in [0, 1] whose nearest training image is of class `labels`."""
    _, predicted = _nearest_training_image(images)
    return (predicted == labels.cpu()).float().mean().item()


def nearest_distance(images: torch.Tensor) -> float:
    """Mean L2 distance from each image [N, 1, H, W] in [0, 1] to its nearest training image."""
    distances, _ = _nearest_training_image(images)
    return distances.mean().item()
