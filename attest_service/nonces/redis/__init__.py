"""The nonce store in Redis: standalone, behind Sentinel, or a Redis Cluster.

:mod:`~.urls` turns a URL into a :class:`~.store.RedisNonceStore`; the store decides with the Lua scripts
of :mod:`~.scripts` on the keys of :mod:`~.keys`, sent over :mod:`~.connection`'s group-commit connection.
"""
