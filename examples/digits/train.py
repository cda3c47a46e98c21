"""Train the digits DiT with rectified flow on one CPU thread and write digit_dit.pt and samples.png.

    python -m examples.digits.train [--steps 2000] [--out examples/digits/digit_dit.pt]

Deterministic for a seed (one thread, seeded generators). AdamW with warmup and cosine decay;
the checkpoint holds an exponential moving average of the weights (smoother velocity field than
the last iterate), stored in fp16 to halve the file: `load` casts back to fp32. At the end it
prints the held-out loss and two sanity numbers on 100 samples (28 Euler steps, seed 0), see
quality.py.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from PIL import Image

from .data import load_digits
from .model import DEFAULT_CHECKPOINT, DEFAULT_CONFIG, DigitDiT, flow_loss, load, sample
from .quality import class_accuracy, nearest_distance


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def update_average(average: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.998) -> None:
    """EMA whose decay ramps up from 0, so the random initial weights wash out of the average."""
    rate = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for avg, new in zip(average.parameters(), model.parameters()):
            avg.lerp_(new, 1 - rate)


def train(steps: int, batch_size: int, peak_lr: float, seed: int) -> DigitDiT:
    images, labels = load_digits("train")
    torch.manual_seed(seed)
    model = DigitDiT(**DEFAULT_CONFIG)
    average = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = flow_loss(model, images[batch], labels[batch], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_average(average, model, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  running {running:.4f}", flush=True)
    return average.eval()


def held_out_loss(model: DigitDiT, seed: int = 0) -> float:
    images, labels = load_digits("held_out")
    with torch.no_grad():
        return flow_loss(model, images, labels, torch.Generator().manual_seed(seed)).item()


def save_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 2) -> None:
    """Rows of `columns` images [N, 1, H, W] in [0, 1] as one greyscale PNG, each pixel scale x scale."""
    rows = images.shape[0] // columns
    size = images.shape[-1]
    grid = images[: rows * columns, 0].view(rows, columns, size, size).permute(0, 2, 1, 3).reshape(rows * size, columns * size)
    pixels = (grid * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").resize((columns * size * scale, rows * size * scale), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.time()
    trained = train(args.steps, args.batch_size, args.lr, args.seed)
    state = {name: tensor.half() for name, tensor in trained.state_dict().items()}
    torch.save({"config": trained.config, "state_dict": state}, args.out)
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")

    model = load(args.out)
    print(f"parameters {sum(p.numel() for p in model.parameters())}")
    print(f"held-out loss: trained {held_out_loss(model):.4f}, untrained {held_out_loss(DigitDiT(**DEFAULT_CONFIG)):.4f}")
    labels = torch.arange(10).repeat_interleave(10)
    samples = sample(model, labels, steps=28, seed=0)
    save_grid(samples, args.out.with_name("samples.png"), columns=10)
    real, real_labels = load_digits("held_out")
    real = (real + 1) / 2
    print(f"nearest-neighbour class accuracy: samples {class_accuracy(samples, labels):.3f}, real held-out {class_accuracy(real, real_labels):.3f}")
    print(f"nearest training image: samples {nearest_distance(samples):.3f}, real held-out {nearest_distance(real):.3f}")


if __name__ == "__main__":
    main()
