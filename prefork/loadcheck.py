"""Loading the handler before anything is bound, as the user it will run as.

A start and ``--check-config`` fork one child that becomes ``--user`` /
``--group``, enters ``--chdir`` and ``--pythonpath``
(:func:`prefork.workers.loading.enter_paths`) and imports the handler as a
generation's mold (or a ``--no-preload`` worker) will, then says on a pipe
whether it could and exits. The master binds nothing before the answer: a
handler that cannot load is one line naming the user's file and line, exit
status 2, no port bound and no process left (the traceback is in the log at
``--log-level debug``). The child dies with the master (``PR_SET_PDEATHSIG``).

The mold imports the handler again after the listeners are bound: the check
costs a fork and one import, and leaves the master free of the user's code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import NoReturn

from prefork.config import Config
from prefork.prctl import set_pdeathsig
from prefork.privileges import Identity, PrivilegeError, drop
from prefork.workers.loading import HandlerLoadError, handler_for

log = logging.getLogger(__name__)

MAX_ANSWER = 4096  # bytes of the child's one line read at most
CHECK_FAILED = 2  # the child's exit status when it said why on the pipe
# what an operator sends the master (reload, log reopen, upgrade, scale): never the check's business
MASTERS_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU,
                             signal.SIGWINCH})


def check_loads(config: Config, identity: Identity | None) -> None:
    """Import ``config``'s handler in a child running as ``identity``; raises HandlerLoadError (or
    PrivilegeError) with the child's one line when it cannot."""
    began = time.monotonic()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    # the operator's signals are the master's: blocked across the fork, then ignored in the child, so one
    # that reaches the child (a pkill by name, sent the instant it exists) does not kill the check
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTERS_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        os.close(read_fd)
        for signum in MASTERS_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        _check_in_child(config, identity, write_fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(write_fd)
    answer = b""
    try:
        while len(answer) < MAX_ANSWER and (chunk := os.read(read_fd, MAX_ANSWER)):
            answer += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    line = answer.decode("utf-8", "replace").strip()
    if os.waitstatus_to_exitcode(status) == 0 and not line:
        log.debug("handler %s loads as user %s (checked in %.3fs)", config.effective_handler,
                  identity.user if identity else "(ours)", time.monotonic() - began)
        return
    kind, _, why = line.partition(" ")
    if kind == "privileges":
        raise PrivilegeError(why)
    if kind != "handler" or not why:
        why = f"cannot load handler: the check ended with status {os.waitstatus_to_exitcode(status)} (see the log)"
    raise HandlerLoadError(why)


def _check_in_child(config: Config, identity: Identity | None, fd: int) -> NoReturn:
    """Become ``identity``, import the handler, write why it failed (if it did) on ``fd``, exit."""
    status = 1
    try:
        set_pdeathsig(signal.SIGKILL)
        if identity is not None:
            drop(identity)
        handler_for(config)  # what the mold does: the paths, the import, the worker class and relay checks
        status = 0
    except PrivilegeError as exc:
        status = _say(fd, f"privileges {exc}")
    except HandlerLoadError as exc:
        status = _say(fd, f"handler {exc}")
    except BaseException:
        log.exception("the check of handler %s failed", config.effective_handler)
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(status)


def _say(fd: int, line: str) -> int:
    os.write(fd, " ".join(line.split()).encode()[:MAX_ANSWER])
    return CHECK_FAILED
