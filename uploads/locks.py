"""One writer per upload, across threads, processes and (on PostgreSQL) hosts.

Both kinds of lock are held by the kernel or the database on behalf of a connection or file
descriptor, so they die with the process that held them: a SIGKILLed worker never leaves a stale
lock behind (RELIABILITY.md §6.4; tusd#437 shows what PID files do). Neither is the only fence: the
offset is also committed with a conditional UPDATE, so a writer that lost its lock cannot move it.

- PostgreSQL: a session-level advisory lock on the upload id. Not a row lock, because a row lock
  needs a transaction open for the whole request body, and progress is committed while it streams.
- Anything else (SQLite): `flock` on a per-upload lock file. Per open file description, so two
  threads of one gthread worker exclude each other too (POSIX `fcntl` locks would not).

Every chunk takes the lock and then reads the row under it, and every tus HEAD looks at the lock
and then reads the row: on PostgreSQL each pair is one round trip, through a database function
whose second statement takes a snapshot of its own (migration 0004), so the order is kept. The
look tries the lock shared and gives it straight back (migration 0007), as `is_held` does with the
lock files; only `is_held` on PostgreSQL reads `pg_locks`, for tests that need another session's
view of a lock their own connection might hold. A chunk sent with a token does it in the
statement that reads the token, for the token's owner only (migration 0006,
`lock_and_read_with`), and its last commit releases the lock after committing, in the same round
trip (migration 0005, `commit_offset`): two round trips per chunk in all.

Release requests (TUS.md N7, tusd's `.stop` file, @tus/server's `requestRelease`): a request that
finds the upload held asks the holder to let go, by creating a release file next to the partial
file (so it works across workers and hosts sharing MEDIA_ROOT, and needs neither Redis nor the
database). A holder streaming a body is watched by one thread per process; when its release file
appears, the holder's body stream is interrupted (its socket's read side shut down, which also
wakes a read stuck on a half-open connection), the holder commits what it durably has and lets go,
and the newer request gets the upload within a fraction of a second instead of a lock timeout.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime

from django.db import DatabaseError, connection
from django.db.models import Model

from . import rows, storage
from .conf import conf
from .exceptions import UploadBusy
from .models import UploadSession

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02
# A waiter repeats its release request this often: the holder it asked may have been replaced by
# another waiter that got the lock first (newest request wins, as in tusd).
RELEASE_REPEAT_SECONDS = 0.5
WATCH_SECONDS = 0.1


def _advisory_key(upload_id: uuid.UUID) -> int:
    # 64 random bits of the id: collisions are possible in theory and would only serialise two
    # unrelated uploads, never let two writers into one.
    return int.from_bytes(uuid.UUID(str(upload_id)).bytes[:8], "big", signed=True)


def _wait(try_acquire: Callable[[], bool], timeout: float, ask_release: Callable[[], None] | None) -> None:
    deadline = time.monotonic() + timeout
    asked_at = None
    while not try_acquire():
        now = time.monotonic()
        if now >= deadline:
            raise UploadBusy()
        if ask_release is not None and (asked_at is None or now - asked_at >= RELEASE_REPEAT_SECONDS):
            ask_release()
            asked_at = now
        time.sleep(POLL_SECONDS)


class Held:
    """An upload's lock while a request holds it (what `upload_lock` yields).

    On PostgreSQL it can be released by the statement that commits the offset (`commit_offset`),
    which spares the chunk a round trip of its own to unlock; `released` then says so.
    """

    def __init__(self, key: int | None) -> None:
        self.key = key  # the advisory key; None where the lock is a file's
        self.released = False


@contextmanager
def _advisory_lock(
    upload_id: uuid.UUID, timeout: float, ask_release: Callable[[], None] | None, reload: Model | None
) -> Iterator[Held]:
    key = _advisory_key(upload_id)
    held = Held(key)
    fresh: list[Model | None] = []

    def try_acquire() -> bool:
        if reload is None:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
                return bool(cursor.fetchone()[0])
        # The lock, then the row as committed once it is granted: one round trip (migration 0004).
        answer = rows.flagged(type(reload), "uploads_lock_and_read", key, reload.pk)
        if answer is None:  # granted, and the row is gone
            fresh.append(None)
            return True
        granted, row = answer
        if granted:
            fresh.append(row)
        return granted

    _wait(try_acquire, timeout, ask_release)
    try:
        if reload is not None:
            _reloaded(reload, fresh[0])
        yield held
    finally:
        release(held)


def release(held: Held) -> None:
    """Release the lock unless that was done already (by `commit_offset`, or an earlier call)."""
    if held.released or held.key is None:
        return
    held.released = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [held.key])
    except DatabaseError:
        # The connection is gone, and the lock went with it.
        pass


@contextmanager
def _file_lock(
    upload_id: uuid.UUID, timeout: float, ask_release: Callable[[], None] | None, reload: Model | None
) -> Iterator[Held]:
    fd = storage.open_lock_file(upload_id)
    try:
        _wait(lambda: _try_flock(fd, fcntl.LOCK_EX), timeout, ask_release)
        if reload is not None:
            rows.reload(reload)
        yield Held(None)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _reloaded(instance: Model, fresh: Model | None) -> None:
    if fresh is None:
        model = type(instance)
        raise model.DoesNotExist(f"{model.__name__} {instance.pk} no longer exists.")
    rows.reload(instance, fresh)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


_HELD_SQL = """
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND objsubid = 1
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = (%s::bigint)::oid AND objid = (%s::bigint)::oid
    )
"""


def look_and_read(upload_id: uuid.UUID) -> tuple[bool, UploadSession | None]:
    """Whether a request holds the upload's lock at this moment (see `is_held`), then its row as
    committed after that look (None if there is none): on PostgreSQL in one round trip."""
    return look_and_read_with(rows.together, upload_id)


def look_and_read_with(
    read: Callable[..., list | None], upload_id: uuid.UUID
) -> tuple[bool, UploadSession | None] | None:
    """`look_and_read` through `read`, a `rows.together` that may read other rows in the same
    statement (`authentication.read_with_token`); None if `read` read nothing."""
    if uses_lock_files():
        held = is_held(upload_id)
        results = read(rows.Part(UploadSession, equals=(("pk", upload_id),)))
        return None if results is None else (held, results[0])
    part = rows.Part(UploadSession, function="uploads_look_and_read", params=(_advisory_key(upload_id), upload_id))
    results = read(part)
    if results is None:
        return None
    held, upload = results[0]
    return bool(held), upload


def lock_and_read_with(
    read: Callable[..., list | None], upload_id: uuid.UUID, *, owner: rows.Column
) -> tuple[Held | None, UploadSession | None] | None:
    """Take the upload's lock if `owner` (a column of a row `read` reads too: the token's user) owns
    it and it is unfinished, then read its row; both in `read`'s one statement (migration 0006).

    Returns the lock if taken (the row was then read under it: adopt it with
    `upload_lock(held=...)`, and `release` it if the request ends first) or None, with the row as
    read (not under the lock, to be locked and read again as usual). None if `read` read nothing.
    Other databases take no lock here.
    """
    if uses_lock_files():
        results = read(rows.Part(UploadSession, equals=(("pk", upload_id),)))
        return None if results is None else (None, results[0])
    key = _advisory_key(upload_id)
    part = rows.Part(UploadSession, function="uploads_lock_and_read_owned", params=(key, upload_id, owner))
    results = read(part)
    if results is None:
        return None
    taken, upload = results[0]
    return (Held(key) if taken else None), upload


def is_held(upload_id: uuid.UUID) -> bool:
    """Whether a request holds the upload's lock at this moment, without waiting for it.

    A reader that checks this *before* reading the row learns whether a writer that started
    earlier may still move the offset; if none does, the row it reads next is the committed state.
    """
    if uses_lock_files():
        fd = storage.open_existing_lock_file(upload_id)
        if fd is None:
            return False
        try:
            return not _try_flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)  # and with it the shared lock, if it was granted
    # A bigint advisory key shows in pg_locks as its high and low 32 bits (classid, objid).
    key = _advisory_key(upload_id) & 0xFFFF_FFFF_FFFF_FFFF
    with connection.cursor() as cursor:
        cursor.execute(_HELD_SQL, [key >> 32, key & 0xFFFF_FFFF])
        return bool(cursor.fetchone()[0])


@functools.cache
def uses_lock_files() -> bool:
    """Whether upload locks are `flock`s on lock files (anything but PostgreSQL).

    Asked once per process: the database is fixed by the settings, and each look through the
    `connection` proxy costs a thread-local look-up, on every request's hot path.
    """
    return connection.vendor != "postgresql"


@contextmanager
def upload_lock(
    upload_id: uuid.UUID,
    timeout: float | None = None,
    *,
    ask_release: bool = True,
    reload: Model | None = None,
    held: Held | None = None,
) -> Iterator[Held]:
    """Hold the upload exclusively; raise UploadBusy (423) after `timeout` seconds of waiting.

    While waiting, the holder is asked to release (unless `ask_release` is False, e.g. cleanup,
    which must never interrupt a client). `reload`: an instance of the upload to read again as
    soon as the lock is held (in the same round trip on PostgreSQL), raising DoesNotExist if its
    row is gone. `held`: the lock, taken already with the row read under it (`lock_and_read_with`),
    to adopt instead of taking it: nothing is waited for or read, and it is released as usual.
    """
    if held is not None and not held.released:
        try:
            storage.clear_release_request(upload_id)
            yield held
        finally:
            release(held)
        return
    timeout = conf.LOCK_TIMEOUT if timeout is None else timeout
    lock = _file_lock if uses_lock_files() else _advisory_lock
    asker = (lambda: storage.request_release(upload_id)) if ask_release else None
    with lock(upload_id, timeout, asker, reload) as held:
        # Any request made before we got the lock was aimed at the previous holder: answered.
        storage.clear_release_request(upload_id)
        yield held


def commit_offset(
    upload_id: uuid.UUID, *, old: int, new: int, now: datetime, expires_at: datetime, durable: bool,
    then_release: Held | None = None,
) -> int | None:
    """Commit the upload's offset `old` -> `new` (a conditional UPDATE: the rows changed, 0 or 1)
    through the procedure of migration 0005, then release `then_release`, in one round trip.

    `durable` False lets this commit skip PostgreSQL's WAL flush (UPLOADS_FSYNC=0). Returns None
    where the procedure cannot be used, leaving the caller to UPDATE and the lock to be released
    on its own: other databases, and inside a transaction block, where a procedure may not COMMIT.
    """
    if uses_lock_files() or connection.in_atomic_block or not connection.get_autocommit():
        return None
    key = then_release.key if then_release is not None and not then_release.released else None
    with connection.cursor() as cursor:
        cursor.execute(
            "CALL uploads_commit_offset(%s, %s, %s, %s, %s, %s, %s, NULL)",
            [upload_id, old, new, now, expires_at, durable, key],
        )
        (updated,) = cursor.fetchone()
    if key is not None:
        then_release.released = True
    return updated


# One key for every creation: its advisory lock serialises the free-space check across users.
_CREATION_KEY = int.from_bytes(b"uploads+", "big", signed=True)  # 8 bytes: a bigint


def creation_lock() -> None:
    """Serialise creations until the caller's transaction ends (the free-space reservation).

    PostgreSQL: a transaction-level advisory lock. SQLite serialises every write transaction
    already (BEGIN IMMEDIATE), so there is nothing to do.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CREATION_KEY])


def release_on_request(
    upload_id: uuid.UUID,
    interrupt: Callable[[], None] | None,
    *,
    stalled: Callable[[], bool] | None = None,
    cut: Callable[[], None] | None = None,
):
    """Call `interrupt` (once, from the watcher thread) if another request asks for the upload
    while the block runs; or call `cut` once `stalled()` says the body has made no progress for
    too long (a trickle that a socket timeout per read never catches, RELIABILITY H5).
    Wrap only the body-reading loop: after it, the holder ends on its own."""
    if interrupt is None:
        return nullcontext()
    return _watcher.watching(upload_id, interrupt, stalled, cut)


class _ReleaseWatcher:
    """One daemon thread per process polls the release files of the uploads being streamed."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._watched: dict[object, tuple] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def watching(
        self,
        upload_id: uuid.UUID,
        interrupt: Callable[[], None],
        stalled: Callable[[], bool] | None = None,
        cut: Callable[[], None] | None = None,
    ) -> Iterator[None]:
        token = object()
        with self._mutex:
            self._watched[token] = (upload_id, interrupt, stalled, cut)
            self._start()
        try:
            yield
        finally:
            # Under the mutex: once this returns, `interrupt` is not running and never will,
            # so it cannot touch a connection that has moved on to its next request.
            with self._mutex:
                self._watched.pop(token, None)

    def _start(self) -> None:
        # A thread started before a fork does not exist in the child: start one per process.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="uploads-release-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            with self._mutex:
                for token, (upload_id, interrupt, stalled, cut) in list(self._watched.items()):
                    try:
                        if storage.release_requested(upload_id):
                            del self._watched[token]
                            logger.info("upload %s: a newer request asked this one to stop", upload_id)
                            interrupt()
                        elif stalled is not None and cut is not None and stalled():
                            del self._watched[token]
                            logger.info("upload %s: the body made no progress for too long", upload_id)
                            cut()
                    except Exception:  # noqa: BLE001 - the watcher must outlive any one upload
                        logger.exception("release watcher failed for upload %s", upload_id)


_watcher = _ReleaseWatcher()
