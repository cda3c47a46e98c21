# torchrun --nproc_per_node=2 examples/cache.py     (a trained 8-block DiT from examples/digits, 28 Euler steps)
import os

import torch
import torch.distributed as dist

import para_fx
from digits import model as digits

dist.init_process_group()
device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
mesh = para_fx.init_mesh(device_type=device.type)
model = digits.load().to(device)                   # velocity = model(x [B, 1, 16, 16], t [B], labels [B])

cache = para_fx.FirstBlockCache(threshold=0.08)    # warmup_steps=0, max_consecutive_skips=None, compute_first=1, compute_last=0
compiler = "inductor" if device.type == "cuda" else "aot_eager"  # CPU: a check, no C++ builds of Inductor
model = torch.compile(model, backend=para_fx.backend(mesh=mesh, cache=cache, compiler=compiler))
labels = torch.arange(10, device=device)
x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)  # noise at t = 1
steps = 28
with torch.no_grad(), para_fx.cache_session(model):   # one generation: fresh state
    for i in range(steps):
        t = torch.full((10,), 1 - i / steps, device=device)
        with para_fx.cache_context(model, "cond"):     # one state per context: CFG pipelines add "uncond"
            velocity = model(x, t, labels)
        x = x - velocity / steps                        # an Euler step towards t = 0
stats = para_fx.cache_stats(model)                      # CacheStats(steps, computed, skipped, diffs)
print(f"rank {dist.get_rank()}: {stats.skipped} of {stats.steps} steps skipped")
dist.destroy_process_group()
