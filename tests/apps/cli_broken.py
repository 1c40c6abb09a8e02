"""A handler module whose import fails: the daemon must say so in one line, without a traceback."""

from socketserver import BaseRequestHandler

raise RuntimeError("cli_broken refuses to load")


class Handler(BaseRequestHandler):  # never reached
    def handle(self) -> None:
        pass
