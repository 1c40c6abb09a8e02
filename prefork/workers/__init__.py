"""The worker processes: one lifecycle (``base``), the worker classes that serve under it, and what they share.

* ``entry``: the child's entry point after ``fork`` (:class:`~prefork.workers.entry.WorkerSpec`, exit codes).
* ``base``: the lifecycle every worker class obeys (signals, stop, retire, orphan check, drain decisions).
* ``servers``: the ``sync`` and ``thread`` classes, socketserver servers on the shared listeners.
* ``async_worker`` and ``echo_engine``: the ``async`` class and its transport-free built-in echo.
* ``loading``: importing and checking the user's handler.
* ``connection``: per-connection helpers shared by every class and the built-in handlers.
"""
