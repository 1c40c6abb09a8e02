"""The recipe's echo server with ``TCPServer(('', 20000), EchoHandler)`` changed to ``PreforkServer``.

The handlers are the recipe's, unchanged, and an asyncio.Protocol for the
async worker class. The tests copy this file and run it as
``python api_recipe.py CONTROL WORKER_CLASS HANDLER`` on 127.0.0.1.
"""

import asyncio
import os
import sys
from socketserver import BaseRequestHandler, StreamRequestHandler

from prefork import PreforkServer


class EchoHandler(BaseRequestHandler):
    def handle(self):
        print('Got connection from', self.client_address)
        while True:
            msg = self.request.recv(8192)
            if not msg:
                break
            self.request.send(msg)


class StreamEchoHandler(StreamRequestHandler):
    def handle(self):
        print('Got connection from', self.client_address)
        # self.rfile is a file-like object for reading
        for line in self.rfile:
            # self.wfile is a file-like object for writing
            self.wfile.write(line)


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        print('Got connection from', transport.get_extra_info('peername'))
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


if __name__ == '__main__':
    control, worker_class, handler = sys.argv[1:4]
    sys.stdout.write(f'started {os.getpid()} {sys.argv}\n')  # one write: workers print meanwhile
    serv = PreforkServer(('127.0.0.1', 0), globals()[handler], workers=2, worker_class=worker_class,
                         control=control)
    serv.serve_forever()
    print('serve_forever returned in', os.getpid())
