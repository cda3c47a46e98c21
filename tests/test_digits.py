"""The trained digits DiT (examples/digits) that the First Block Cache quality study runs on.

Checks that the shipped checkpoint loads into the expected shape, that sampling is a pure
function of the seed, and that training bought something: lower held-out rectified-flow loss
than an untrained model, and samples whose nearest real
training digit is of the class asked for.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root, for examples.digits

pytest.importorskip("sklearn")

from examples.digits import model as digits  # noqa: E402
from examples.digits.data import load_digits  # noqa: E402
from examples.digits.quality import class_accuracy  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of a few 16x16 images: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return digits.load()


def test_checkpoint_loads_as_fp32_eval_model_with_blocks(trained):
    assert digits.DEFAULT_CHECKPOINT.stat().st_size < 5e6
    assert not trained.training
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    assert isinstance(trained.blocks, torch.nn.ModuleList) and len(trained.blocks) == trained.config["depth"] >= 6


def test_sample_is_a_function_of_the_seed(trained):
    labels = torch.tensor([0, 3, 7, 9])
    first = digits.sample(trained, labels, steps=28, seed=5)
    again = digits.sample(lambda x, t, y: trained(x, t, y), labels, steps=28, seed=5)
    other = digits.sample(trained, labels, steps=28, seed=6)
    assert first.shape == (4, 1, 16, 16) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert digits.psnr(first, other) < 20


def test_psnr_in_db_for_unit_range():
    zeros = torch.zeros(2, 1, 4, 4)
    assert digits.psnr(zeros, zeros) == math.inf
    assert digits.psnr(zeros, zeros + 0.1) == pytest.approx(20.0)


def test_trained_beats_untrained_on_held_out_flow_loss(trained):
    images, labels = load_digits("held_out")
    untrained = digits.DigitDiT(**trained.config).eval()
    with torch.no_grad():
        losses = {
            name: digits.flow_loss(model, images, labels, torch.Generator().manual_seed(0)).item()
            for name, model in (("trained", trained), ("untrained", untrained))
        }
    # Measured: trained 0.132, untrained 1.558 (its zero-initialised output layer predicts 0).
    assert losses["trained"] < 0.25 * losses["untrained"], losses


def test_samples_are_recognised_as_their_class(trained):
    labels = torch.arange(10).repeat_interleave(4)
    images = digits.sample(trained, labels, steps=28, seed=0)
    # Measured: 0.975 on these 40 samples; real held-out digits score 0.99.
    assert class_accuracy(images, labels) >= 0.85
