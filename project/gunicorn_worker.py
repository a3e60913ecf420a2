"""gunicorn's gthread worker, serving a kept-alive connection's next request on the same thread.

gthread hands a connection back to its main loop after every request and takes it up again when
the next request arrives: unregister and re-register with the poller, a pipe write to wake the
loop, a fresh submit to the thread pool. On this project's machine that is about half of
gunicorn's own CPU per request (a bare WSGI app: 0.28 against 0.14 ms; bench/README.md), and a
sixth of a tus HEAD's. A client uploading in chunks, or resuming with HEAD then PATCH, sends its
next request within a millisecond of the last response, so the thread waits a moment for it
(`LINGER_SECONDS`) and serves it directly, as gunicorn's sync worker does.

Only while no other connection is waiting for a thread: a connection never keeps another one
waiting longer than its current request (plus at most one linger). Everything else (timeouts,
keep-alive limits, graceful stop, max_requests, HTTP/2) stays gthread's: the connection returns to
the main loop exactly as before once it pauses, closes, or another connection needs the thread.
"""
from __future__ import annotations

import os
import select
import threading

from gunicorn.workers import gthread

# Long enough for a script's or a tus client's next chunk, short enough that a thread never idles
# for long on a connection that went quiet. GUNICORN_LINGER (seconds; 0 turns it off) overrides.
LINGER_SECONDS = float(os.environ.get("GUNICORN_LINGER") or "0.005")


class ThreadWorker(gthread.ThreadWorker):
    def init_process(self) -> None:
        self._waiting = 0  # connections submitted to the pool and not yet taken up by a thread
        self._waiting_lock = threading.Lock()
        super().init_process()

    def enqueue_req(self, conn) -> None:
        with self._waiting_lock:
            self._waiting += 1
        super().enqueue_req(conn)

    def handle(self, conn):
        with self._waiting_lock:
            self._waiting -= 1
        keepalive = super().handle(conn)
        while keepalive is True and self._next_request_here(conn):
            keepalive = super().handle(conn)
        return keepalive

    def _next_request_here(self, conn) -> bool:
        """Whether this thread should serve the connection's next request itself."""
        if not self.alive or conn.is_http2 or self._waiting or LINGER_SECONDS <= 0:
            return False
        if conn.parser.unreader.buf.getvalue():
            return True  # already received (pipelined, or read ahead by a body drain)
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        # Readable also when the client closed: the parser then ends the connection as usual.
        return bool(poller.poll(LINGER_SECONDS * 1000))
