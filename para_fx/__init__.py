"""para-fx: context parallelism and First Block Cache for diffusion transformers, in the compiler."""

from .attention import context_parallel_attention
from .mesh import init_mesh

__all__ = ["context_parallel_attention", "init_mesh"]
