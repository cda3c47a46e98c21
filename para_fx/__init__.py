"""para-fx: context parallelism and First Block Cache for diffusion transformers, in the compiler.

    model = torch.compile(model, backend=para_fx.backend(mesh=para_fx.init_mesh(), cache=para_fx.FirstBlockCache(0.08)))

Where things are:

* ``para_fx`` (this module): the backend, the mesh, the First Block Cache, ``explain`` and its
  ``Report``, and the attention primitive ``context_parallel_attention``.
* ``para_fx.core``: what compiling does: the backend, the capture, placements, the mesh, the
  ranks' agreement, the cache's settings.
* ``para_fx.passes``: the graph passes (sharding, First Block Cache).
* ``para_fx.runtime``: what runs at step time: attention across ranks, collectives, the cache's
  state; ``para_fx.runtime.runner``, a persistent multi-rank runner for serving.
* ``para_fx.inspect``: ``explain`` and its report (text, HTML, graph dumps);
  ``python -m para_fx explain``, the report from the command line (``para_fx.inspect.cli``).
* ``para_fx.adapters.diffusers``: diffusers pipelines under ParaAttention's names
  (``parallelize_pipe``, ``apply_cache_on_pipe``, ``parallelize_vae``, ...).
* ``para_fx.testing``: fixtures. ``para_fx.testing.zoo``: tiny random diffusers transformers,
  ``(model, kwargs)`` each; ``para_fx.testing.tiny_pipelines``: tiny real pipelines;
  ``para_fx.testing.dits``: two plain-PyTorch DiTs; ``para_fx.testing.launch``: run a function
  on N local CPU ranks.
"""

from .core.agreement import InputsDiffer, RanksOutOfStep
from .core.backend import backend, register_para_backend
from .core.cache import FirstBlockCache
from .core.mesh import init_mesh
from .inspect.explain import explain
from .inspect.report import Report
from .runtime.attention import context_parallel_attention
from .runtime.cache import CacheStats, cache_context, cache_session, cache_stats

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
