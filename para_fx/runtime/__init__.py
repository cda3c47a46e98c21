"""Step time: attention across ranks, the collectives the passes insert, the cache's state, the serving runner."""
