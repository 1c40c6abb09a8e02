"""The master process: one loop supervising the workers. Parses no protocol.

* ``loop``: :class:`~prefork.master.loop.Master`, the selector loop, signals, and the lifecycle
  (start, reload, scale, stop, drain for a load balancer, upgrade).
* ``pool``: the worker table: forking, draining, killing, heartbeats, reaping.
* ``exits``: how an exit reads and what the master does about it (pure functions).
* ``reload``: the reload in flight, the ones queued behind it and the replies held until it took effect.
* ``timers``: every deadline the loop waits for, each written once.
* ``commands``: the control socket's commands, a table from name to handler.
* ``report``: the ``status`` and ``stats`` payloads, from a typed snapshot.
* ``state``: the master's records (workers, backoff, counters) and its modes as enums.
"""
