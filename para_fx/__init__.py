"""para-fx: context parallelism and First Block Cache for diffusion transformers, in the compiler.

    model = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), cache=para_fx.FirstBlockCache(0.08)))

Where things are:

* ``para_fx`` (this module): the backend, the mesh, the First Block Cache, ``explain`` and its
  ``Report``, and the attention primitive ``context_parallel_attention``.
* ``para_fx.adapters.diffusers``: diffusers pipelines under ParaAttention's names
  (``parallelize_pipe``, ``apply_cache_on_pipe``, ``parallelize_vae``, ...);
  ``para_fx.adapters.tiny_pipelines``: tiny real pipelines for tests.
* ``para_fx.zoo``: tiny random diffusers transformers, ``(model, kwargs)`` each.
* ``para_fx.runner``: a persistent multi-rank runner for serving; ``para_fx.launch``: run a
  function on N local CPU ranks.
* ``python -m para_fx explain``: the report from the command line (``para_fx.cli``).
* ``para_fx.passes``: the graph passes (sharding, First Block Cache).
"""

from .agreement import InputsDiffer, RanksOutOfStep
from .attention import context_parallel_attention
from .backend import backend, register_para_backend
from .cache import CacheStats, FirstBlockCache, cache_context, cache_session, cache_stats
from .explain import explain
from .mesh import init_mesh
from .report import Report

__version__ = "0.1.0"

register_para_backend()

__all__ = [
    "CacheStats",
    "FirstBlockCache",
    "InputsDiffer",
    "RanksOutOfStep",
    "Report",
    "__version__",
    "backend",
    "cache_context",
    "cache_session",
    "cache_stats",
    "context_parallel_attention",
    "explain",
    "init_mesh",
]
