"""Adapters from libraries' objects to para-fx.

* :mod:`para_fx.adapters.diffusers`: diffusers pipelines, under ParaAttention's names
  (``init_context_parallel_mesh``, ``parallelize_pipe``, ``apply_cache_on_pipe``,
  ``parallelize_vae``, ``make_traceable``, ``last_cache_stats``).

Tiny real pipelines to try them on without a download are test fixtures:
:mod:`para_fx.testing.tiny_pipelines`.

The backend itself needs no adapter: these only do what a compiler cannot see (seeds agreed
across ranks, one cache session per pipeline call, the VAE, graph breaks in a model's code).
"""
