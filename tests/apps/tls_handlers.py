"""socketserver handlers for the TLS tests: what the handler sees of the TLS connection."""

from __future__ import annotations

import socketserver
import ssl


class WhoHandler(socketserver.StreamRequestHandler):
    """Answers one line about the connection, then echoes lines.

    ``version cipher-bits alpn peer-cn client-host`` ("-" for what is absent):
    the verified client certificate is ``self.request.getpeercert()``.
    """

    def handle(self) -> None:
        request = self.request
        assert isinstance(request, ssl.SSLSocket), type(request)
        cert = request.getpeercert() or {}
        cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "-")
        cipher = request.cipher()
        fields = [request.version() or "-", str(cipher[2]) if cipher else "-",
                  request.selected_alpn_protocol() or "-", cn.replace(" ", "_"), str(self.client_address[0])]
        self.wfile.write((" ".join(fields) + "\n").encode())
        self.wfile.flush()
        for line in self.rfile:
            self.wfile.write(line)
