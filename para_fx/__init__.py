"""para-fx: context parallelism and First Block Cache for diffusion transformers, in the compiler."""

from .attention import context_parallel_attention
from .backend import backend, register_para_backend
from .cache import CacheStats, FirstBlockCache, cache_context, cache_session, cache_stats
from .explain import explain
from .mesh import init_mesh

register_para_backend()

__all__ = [
    "CacheStats",
    "FirstBlockCache",
    "backend",
    "cache_context",
    "cache_session",
    "cache_stats",
    "context_parallel_attention",
    "explain",
    "init_mesh",
]
