"""The response cache behind the ``cache`` plugin (``piuptime.gateway.plugins.cache``).

- ``policy``: what RFC 9111 lets a shared cache store and for how long; what a request asks;
- ``entry``: a stored response, and its compact byte form for Redis;
- ``store``: the in-process byte-bounded LRU, the per-zone coordination (coalescing, refreshes)
  and the Redis layout.
"""
