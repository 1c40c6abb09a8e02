"""The mold: one process per generation that holds the generation's handler and forks its workers.

* ``process``: the mold's own life (import the handler once, ``gc.freeze()``,
  then fork a worker each time the master asks) and the double fork that
  makes each worker the master's child.
* ``wire``: what the master and a mold say to each other.

The master's side (start a mold, ask it for a worker, end it) is
:mod:`prefork.master.molds`.
"""
