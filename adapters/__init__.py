"""Adapters from libraries' objects to para-fx.

* :mod:`para_fx.adapters.diffusers`: diffusers pipelines, under ParaAttention's names
  (``init_context_parallel_mesh``, ``parallelize_pipe``, ``apply_cache_on_pipe``,
  ``parallelize_vae``, ``make_traceable``, ``last_cache_stats``).
* :mod:`para_fx.adapters.tiny_pipelines`: tiny, randomly initialised real diffusers pipelines
  that run on CPU without a download (tests, ``--tiny`` examples).

The backend itself needs no adapter: these only do what a compiler cannot see (seeds agreed
across ranks, one cache session per pipeline call, the VAE, graph breaks in a model's code).
"""
