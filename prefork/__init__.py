"""prefork: a preforking TCP server daemon for socketserver handlers.

A master process binds the listening sockets once and forks a fixed pool of
workers that each serve them with an unchanged ``socketserver`` request
handler; the master respawns, reloads, scales and stops them, and answers a
control socket (see ``preforkctl``).

From Python (see :mod:`prefork.api`)::

    from prefork import PreforkServer
    PreforkServer(('', 20000), EchoHandler, workers=4).serve_forever()

The API's names are imported on first use: ``import prefork`` stays cheap for
the ``preforkctl`` client and for every module of the daemon that imports the
package (importing :mod:`prefork.api` here would also make an import cycle).
``__init__.pyi`` gives type checkers the same names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["OptionError", "PreforkServer", "ServerError", "ServerOptions", "__version__", "serve"]

_API = frozenset({"OptionError", "PreforkServer", "ServerError", "ServerOptions", "serve"})


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("prefork.api"), name)
    raise AttributeError(f"module 'prefork' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
