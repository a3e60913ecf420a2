"""One writer per upload, across threads, processes and (on PostgreSQL) hosts.

Both kinds of lock are held by the kernel or the database on behalf of a connection or file
descriptor, so they die with the process that held them: a SIGKILLed worker never leaves a stale
lock behind (RELIABILITY.md §6.4; tusd#437 shows what PID files do). Neither is the only fence: the
offset is also committed with a conditional UPDATE, so a writer that lost its lock cannot move it.

- PostgreSQL: a session-level advisory lock on the upload id. Not a row lock, because a row lock
  needs a transaction open for the whole request body, and progress is committed while it streams.
- Anything else (SQLite): `flock` on a per-upload lock file. Per open file description, so two
  threads of one gthread worker exclude each other too (POSIX `fcntl` locks would not).
"""
from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection

from . import storage
from .conf import conf
from .exceptions import UploadBusy

POLL_SECONDS = 0.02


def _advisory_key(upload_id: uuid.UUID) -> int:
    # 64 random bits of the id: collisions are possible in theory and would only serialise two
    # unrelated uploads, never let two writers into one.
    return int.from_bytes(uuid.UUID(str(upload_id)).bytes[:8], "big", signed=True)


def _wait(try_acquire, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not try_acquire():
        if time.monotonic() >= deadline:
            raise UploadBusy()
        time.sleep(POLL_SECONDS)


@contextmanager
def _advisory_lock(upload_id: uuid.UUID, timeout: float) -> Iterator[None]:
    key = _advisory_key(upload_id)

    def try_acquire() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
            return bool(cursor.fetchone()[0])

    _wait(try_acquire, timeout)
    try:
        yield
    finally:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])
        except DatabaseError:
            # The connection is gone, and the lock went with it.
            pass


@contextmanager
def _file_lock(upload_id: uuid.UUID, timeout: float) -> Iterator[None]:
    fd = storage.open_lock_file(upload_id)

    def try_acquire() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        _wait(try_acquire, timeout)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def upload_lock(upload_id: uuid.UUID, timeout: float | None = None) -> Iterator[None]:
    """Hold the upload exclusively; raise UploadBusy (423) after `timeout` seconds of waiting."""
    timeout = conf.LOCK_TIMEOUT if timeout is None else timeout
    lock = _advisory_lock if connection.vendor == "postgresql" else _file_lock
    with lock(upload_id, timeout):
        yield
