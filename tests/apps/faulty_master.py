"""``python -m faulty_master ARGS``: prefork with faults injected into the master's own callbacks.

For tests/test_hardening_master.py: each fault is an exception no boundary
check foresaw, escaping a callback of the master's loop, as a bug would.

* SIGUSR1: reopening the logs raises (a signal action that fails);
* a control request whose body contains ``inject-fault``: the codec raises a
  RuntimeError instead of a ProtocolError (a control client's callback fails).
"""

from __future__ import annotations

import sys

from prefork import cli, control
from prefork.master import loop


def _reopen_fails(self: loop.Master) -> None:
    raise RuntimeError("injected fault: reopening the logs failed")


_decode = control.decode_body


def _decode_fails_on_request(body: bytes) -> dict[str, object]:
    if b"inject-fault" in body:
        raise RuntimeError("injected fault: the codec failed")
    return _decode(body)


loop.Master.reopen_logs = _reopen_fails  # type: ignore[method-assign]
control.decode_body = _decode_fails_on_request

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
