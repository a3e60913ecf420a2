"""A TCP fault proxy for live tests (RELIABILITY.md §4): test client → proxy → gunicorn.

One thread per direction per connection; every mode can be changed while connections are open:

- `throttle(n)`: forward client→server at about n bytes/s (None: full speed);
- `cut_after(n)`: a connection that has forwarded n client→server bytes is closed on both sides;
- `blackhole()` / `unblock()`: stop forwarding in both directions, sockets kept open; resume;
- `reset()`: abort every open connection with an RST (SO_LINGER 0) on both sides;
- `flip(k)`: invert the byte at client→server offset k of the first connection to reach it;
- `drop_responses(True)`: forward requests, but close the client's side as soon as the server's
  answer arrives, so the client never sees it ("ack lost").

Offsets count every byte a connection carries, request headers included.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

BLOCK = 64 * 1024


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.rate: float | None = None
        self.cut: int | None = None
        self.drop = False
        self._flip: int | None = None
        self._open = threading.Event()
        self._open.set()
        self._mutex = threading.Lock()
        self._stopped = False
        self.links: list[_Link] = []
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    # --- modes ---
    def throttle(self, rate: float | None) -> None:
        self.rate = rate

    def cut_after(self, count: int | None) -> None:
        self.cut = count

    def blackhole(self) -> None:
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    def flip(self, offset: int | None) -> None:
        self._flip = offset

    def drop_responses(self, drop: bool = True) -> None:
        self.drop = drop

    def reset(self) -> None:
        for link in list(self.links):
            link.close(rst=True)

    def stop(self) -> None:
        self._stopped = True
        self._open.set()
        self._listener.close()
        for link in list(self.links):
            link.close()

    # --- plumbing ---
    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            link = _Link(self, client, server)
            self.links.append(link)
            link.start()

    def _wait_open(self, link: _Link) -> bool:
        """Hold while blackholed; False once the link or the proxy is closed."""
        while not self._open.wait(0.05):
            if link.closed or self._stopped:
                return False
        return not link.closed

    def _take_flip(self, start: int, length: int) -> int | None:
        with self._mutex:
            if self._flip is not None and start <= self._flip < start + length:
                at, self._flip = self._flip - start, None
                return at
        return None


class _Link:
    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy, self.client, self.server = proxy, client, server
        self.forwarded = 0  # client→server bytes
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._upstream, daemon=True).start()
        threading.Thread(target=self._downstream, daemon=True).start()

    def _upstream(self) -> None:
        proxy = self.proxy
        try:
            while True:
                data = self.client.recv(BLOCK)
                if not data:
                    self.server.shutdown(socket.SHUT_WR)
                    return
                while data:
                    if not proxy._wait_open(self):
                        return
                    rate = proxy.rate
                    piece = bytearray(data[: max(1, int(rate / 20))] if rate else data)
                    data = data[len(piece):]
                    at = proxy._take_flip(self.forwarded, len(piece))
                    if at is not None:
                        piece[at] ^= 0xFF
                    if proxy.cut is not None and self.forwarded + len(piece) >= proxy.cut:
                        self.server.sendall(piece[: proxy.cut - self.forwarded])
                        self.close()
                        return
                    self.server.sendall(piece)
                    self.forwarded += len(piece)
                    if rate:
                        time.sleep(len(piece) / rate)
        except OSError:
            self.close()

    def _downstream(self) -> None:
        try:
            while True:
                data = self.server.recv(BLOCK)
                if not data:
                    self.client.shutdown(socket.SHUT_WR)
                    return
                if not self.proxy._wait_open(self):
                    return
                if self.proxy.drop:
                    self.close()
                    return
                self.client.sendall(data)
        except OSError:
            self.close()

    def close(self, *, rst: bool = False) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            try:
                if rst:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)  # wakes our own blocked recv; no FIN on the wire
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
