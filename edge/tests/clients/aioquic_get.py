"""Sends one HTTP/3 GET with aioquic and prints the status line, then the body.

Usage: aioquic_get.py HOST PORT SNI AUTHORITY PATH CAFILE
The server certificate must chain to CAFILE and be valid for SNI, or the handshake fails.
"""

import asyncio
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    """A QUIC connection that sends one request and collects its response."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = None
        self.status = None
        self.body = b""

    def quic_event_received(self, event):
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                for name, value in h3_event.headers:
                    if name == b":status":
                        self.status = int(value)
            elif isinstance(h3_event, DataReceived):
                self.body += h3_event.data
            else:
                continue
            if h3_event.stream_ended and not self.done.done():
                self.done.set_result(None)

    async def get(self, authority, path):
        self.done = self._loop.create_future()
        stream_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        await asyncio.wait_for(self.done, 10)


async def main(host, port, sni, authority, path, cafile):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni)
    config.load_verify_locations(cafile)
    async with connect(host, int(port), configuration=config, create_protocol=Client) as client:
        await client.get(authority, path)
        print(client.status)
        sys.stdout.write(client.body.decode())


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:7]), 20))
