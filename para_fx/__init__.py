"""para-fx: context parallelism and First Block Cache for diffusion transformers, in the compiler."""

from .attention import context_parallel_attention
from .backend import backend, register_para_backend
from .explain import explain
from .mesh import init_mesh

register_para_backend()

__all__ = ["backend", "context_parallel_attention", "explain", "init_mesh"]
