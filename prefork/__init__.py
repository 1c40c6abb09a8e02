"""prefork: a preforking TCP server daemon for socketserver handlers.

A master process binds the listening sockets once and forks a fixed pool of
workers that each serve them with an unchanged ``socketserver`` request
handler; the master respawns, reloads, scales and stops them, and answers a
control socket (see ``preforkctl``).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
