"""Test-only crash points (RELIABILITY.md §4): named places where the worker SIGKILLs itself.

Off unless `UPLOADS_TEST_HOOKS` is set when the process starts: `crash_point` is then bound to a
function that does nothing, so production pays one call per point and no setting lookups. With
the hooks on, `UPLOADS_CRASH_POINT="<name>"` or `"<name>@<n>"` kills the process the first (or the
n-th) time it reaches that point, the way a power cut or the OOM killer would: no cleanup, no
response, locks released by the kernel and the database.

Points, in the order a chunk passes them: `before_write`, `mid_body` (after each block written),
`after_write`, `after_fsync`, `after_commit`, `after_redis`, `before_response`; while finishing an
upload: `finalize_before_rename`, `finalize_after_rename`, `finalize_after_commit`; while expiring
one (cleanup): `expire_after_delete`, between deleting its data and marking its row expired.

The write log (INV7, one writer per upload): with the hooks on and `UPLOADS_WRITE_LOG` naming a
file, every partial-file writer appends `open <pid> <upload hex> <start ns>` when it opens the file
and `close <pid> <upload hex> <start ns> <end ns>` when it closes it (CLOCK_MONOTONIC, which all
processes on one machine share). Tests read it with `tests/invariants.py:assert_single_writer`.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid

from django.conf import settings

from .conf import conf

POINTS = (
    "before_write", "mid_body", "after_write", "after_fsync", "after_commit", "after_redis",
    "before_response", "finalize_before_rename", "finalize_after_rename", "finalize_after_commit",
    "expire_after_delete",
)


def _parse(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"UPLOADS_CRASH_POINT names no crash point: {name!r} (known: {', '.join(POINTS)})")
    return name, int(count) if count else 1


class _Crasher:
    def __init__(self, spec: str) -> None:
        self.name, self.remaining = _parse(spec) if spec else ("", 0)
        self._mutex = threading.Lock()

    def __call__(self, name: str) -> None:
        if name != self.name:
            return
        with self._mutex:
            self.remaining -= 1
            if self.remaining != 0:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def _nothing(name: str) -> None:
    return None


crash_point = _Crasher(getattr(settings, "UPLOADS_CRASH_POINT", "")) if conf.TEST_HOOKS else _nothing


class _WriteLog:
    def __init__(self, path: str) -> None:
        self._path = path

    def opened(self, upload_id: uuid.UUID) -> int:
        start = time.monotonic_ns()
        self._append(f"open {os.getpid()} {upload_id.hex} {start}\n")
        return start

    def closed(self, upload_id: uuid.UUID, start: int) -> None:
        self._append(f"close {os.getpid()} {upload_id.hex} {start} {time.monotonic_ns()}\n")

    def _append(self, line: str) -> None:
        # One write() of one short line on an O_APPEND descriptor: lines from many processes
        # never interleave. Opened per line, so a fork or a test's new file needs no bookkeeping.
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class _NoWriteLog:
    def opened(self, upload_id: uuid.UUID) -> int:
        return 0

    def closed(self, upload_id: uuid.UUID, start: int) -> None:
        return None


_log_path = getattr(settings, "UPLOADS_WRITE_LOG", "")
write_log = _WriteLog(_log_path) if conf.TEST_HOOKS and _log_path else _NoWriteLog()
