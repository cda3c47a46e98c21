# torchrun --nproc_per_node=2 examples/usage.py     (N ranks: N CPU processes, or one per GPU)
import os

import torch
import torch.distributed as dist

import para_fx
from para_fx.testing import zoo

dist.init_process_group()                          # gloo on CPU; NCCL too when there are GPUs
device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
mesh = para_fx.init_mesh(device_type=device.type)  # all Ulysses; e.g. init_mesh(ulysses=2, ring=2) on 4 ranks
model, inputs = zoo.flux()                         # a tiny random FLUX transformer and its inputs: yours here
model = model.to(device)
inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

compiler = "inductor" if device.type == "cuda" else "aot_eager"  # CPU: a check, no C++ builds of Inductor
compiled = torch.compile(model, backend=para_fx.backend(mesh=mesh, compiler=compiler))
with torch.no_grad():
    out = compiled(**inputs)[0]                    # same inputs on every rank -> the full output on every rank
    error = (out - model(**inputs)[0]).abs().max().item()
print(f"rank {dist.get_rank()}: output {tuple(out.shape)}, max abs error vs eager {error:.1e}")
dist.destroy_process_group()
