"""What the kernel offers a process tree through ``prctl(2)``, through ctypes (no dependency).

* :func:`set_pdeathsig`: a signal this process gets when its parent dies,
  delivered by the kernel whether or not this process's Python code can run.
* :func:`set_child_subreaper`: orphans among this process's descendants are
  re-parented to it rather than to PID 1, so it reaps them (the master, whose
  workers are forked by a mold through a double fork).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - every Linux libc loads
    _libc = None


def _prctl(option: int, value: int) -> bool:
    if _libc is None:
        return False
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        log.debug("prctl(%d, %d) failed: %s", option, value, os.strerror(ctypes.get_errno()))
        return False
    return True


def set_pdeathsig(signum: int) -> bool:
    """Get ``signum`` when the parent dies (0: no longer). Check the parent right after: it may be gone already."""
    return _prctl(PR_SET_PDEATHSIG, signum)


def set_child_subreaper() -> bool:
    """Adopt this process's orphaned descendants."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)
