"""The upload engine: the only code that changes uploads. Every front end calls these.

The write protocol for one chunk (RELIABILITY.md §3), in this order:
lock the upload → compare the claimed start with the committed offset → cut any unacknowledged
tail → write in fixed blocks → fsync → commit the new offset with a conditional UPDATE → update
Redis after the commit → respond. A long request repeats fsync → commit → Redis every
`UPLOADS_COMMIT_BYTES` or `UPLOADS_COMMIT_INTERVAL` as it streams (the seed's "save the read size in
every loop"), so an interrupted request keeps what was durably received. A crash anywhere leaves the
committed offset at or below the bytes on disk, and the next writer truncates the rest.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import digests, locks, progress, rows, selectors, storage
from .conf import conf
from .exceptions import (
    ChecksumMismatch,
    DataLost,
    FinalNotWritable,
    IncompleteBody,
    InvalidRequest,
    OffsetMismatch,
    QuotaExceeded,
    StorageFailure,
    StorageFull,
    TooLarge,
    TooManyUploads,
    UploadComplete,
    UploadConflict,
    UploadError,
    UploadGone,
    UploadReleased,
)
from .faults import crash_point
from .models import Protocol, Status, UploadSession
from .validation import BIGINT_MAX, ChunkDigest, clean_filename, parse_checksum

logger = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# The display name of a tus upload whose client sent no `filename` or `name` metadata.
UNNAMED = "unnamed"


# --- Creation -----------------------------------------------------------------------------------


def upload_create(
    *, owner: AbstractBaseUser, filename: object, size: object, checksum: object = ""
) -> tuple[UploadSession, bool]:
    """Start a REST upload, or return the owner's unfinished one of the same name and size.

    Returns `(upload, created)`. A zero-byte upload is complete at once.
    Raises UploadConflict when an unfinished upload of the same name and size declares another
    checksum.
    """
    filename = clean_filename(filename)
    size = _validate_size(size)
    checksum = parse_checksum(checksum) if checksum is not None else ""

    with transaction.atomic():
        _lock_owner(owner)
        existing = _resumable(owner=owner, filename=filename, size=size, checksum=checksum)
        if existing is not None:
            transaction.on_commit(lambda: progress.record(existing, existing.offset))
            return existing, False
        upload = _insert(owner=owner, filename=filename, size=size, checksum=checksum, protocol=Protocol.REST)
    return upload, True


def upload_create_tus(
    *,
    owner: AbstractBaseUser,
    filename: object | None,
    size: object | None,
    metadata: str = "",
    concat: str = "",
) -> UploadSession:
    """Start a tus upload. Always a new one: tus clients resume by URL, never by name.

    `size` None defers the length (creation-defer-length); `metadata` and `concat` are the raw
    `Upload-Metadata` and `Upload-Concat` headers, kept to echo them exactly.
    """
    filename = clean_filename(filename) if filename is not None else UNNAMED
    size = _validate_size(size) if size is not None else None
    with transaction.atomic():
        _lock_owner(owner)
        upload = _insert(
            owner=owner, filename=filename, size=size, protocol=Protocol.TUS,
            tus_metadata=metadata, tus_concat=concat,
        )
    return upload


def upload_receive_file(*, owner: AbstractBaseUser, filename: object, stream: BinaryIO, size: int) -> UploadSession:
    """Record a whole file received in one request (the page's form without JavaScript).

    Not resumable, but otherwise an upload like any other: always a new one, written through the
    same append path (fsync, committed offset) and finalized the same way.
    """
    filename = clean_filename(filename)
    size = _validate_size(size)
    with transaction.atomic():
        _lock_owner(owner)
        upload = _insert(owner=owner, filename=filename, size=size, protocol=Protocol.FORM)
    if upload.status == Status.PARTIAL:
        upload = upload_append(upload=upload, offset=0, stream=stream, length=size)
    return upload


def _lock_owner(owner: AbstractBaseUser) -> None:
    # Serialise creates per user so resume-by-name and the active-upload cap hold under a burst
    # of parallel requests (RELIABILITY.md H9); a cache-based throttle would not.
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()


def _insert(*, owner: AbstractBaseUser, size: int | None, **fields: object) -> UploadSession:
    """Create the row (and its partial file) inside the caller's transaction and owner lock."""
    if conf.MAX_ACTIVE_PER_USER and (
        selectors.uploads_for_user(user=owner).filter(status=Status.PARTIAL).count()
        >= conf.MAX_ACTIVE_PER_USER
    ):
        raise TooManyUploads(
            f"You have {conf.MAX_ACTIVE_PER_USER} unfinished uploads; finish or cancel some first."
        )
    if size:
        _reserve(owner, size)
    now = timezone.now()
    upload = UploadSession(
        id=uuid.uuid4(), owner=owner, size=size, created_at=now, updated_at=now,
        expires_at=now + conf.EXPIRY, **fields,
    )
    if size == 0:
        _create_empty(upload)
        return upload
    # The file exists durably before the row that points to it (RELIABILITY.md §3).
    storage.create_partial(upload.id, lock_file=locks.uses_lock_files())
    try:
        with transaction.atomic():
            upload.save(force_insert=True)
    except IntegrityError as exc:
        # Only reachable by a racing create that bypassed the per-user lock.
        storage.delete_partial(upload.id)
        raise UploadConflict("Another request is creating this upload; retry.") from exc
    transaction.on_commit(lambda: progress.record(upload, 0))
    return upload


def _reserve(owner: AbstractBaseUser, size: int) -> None:
    """Refuse a new upload whose bytes could not all be stored (RELIABILITY D2, H1).

    Every unfinished upload claims the bytes it has yet to receive. A user may claim at most
    UPLOADS_MAX_RESERVED_PER_USER (checked under the owner lock), and all claims together must
    leave UPLOADS_MIN_FREE_SPACE free on the disk (checked under a lock all creates share), so
    parallel uploads cannot each start and then all stall on a full disk. A deferred size claims
    nothing until it is declared; a full disk mid-chunk is still refused cleanly (507).
    """
    if conf.MAX_RESERVED_PER_USER:
        claimed = selectors.upload_bytes_claimed(user=owner)
        if claimed + size > conf.MAX_RESERVED_PER_USER:
            raise QuotaExceeded(
                f"Your unfinished uploads still need {claimed} bytes; with {size} more that would pass "
                f"your limit of {conf.MAX_RESERVED_PER_USER}. Finish or cancel some first."
            )
    locks.creation_lock()
    free = storage.free_space()
    claimed = selectors.upload_bytes_claimed()
    if claimed + size + conf.MIN_FREE_SPACE > free:
        raise StorageFull(
            f"The server has {free} bytes free and unfinished uploads still need {claimed}; "
            f"there is no room for {size} more. Retry later."
        )


def _resumable(*, owner: AbstractBaseUser, filename: str, size: int, checksum: str) -> UploadSession | None:
    """The owner's unfinished upload to resume for this name and size, if there is one.

    One past its expiry is expired now, freeing the name for a new upload. A declared checksum
    that differs from the unfinished upload's means another file: refuse rather than mix them.
    """
    existing = selectors.upload_partial_by_name(user=owner, filename=filename, size=size)
    if existing is None:
        return None
    if existing.expires_at is not None and existing.expires_at <= timezone.now():
        upload_expire(upload=existing)  # skipped if a request is writing to it right now
        selectors.upload_reload(existing)
        if existing.status != Status.PARTIAL:
            return None
    if checksum and existing.checksum and existing.checksum != checksum:
        raise UploadConflict(
            f"You have an unfinished upload of {filename!r} ({size} bytes) declared with another "
            "checksum; resume it without a checksum, or delete it first.",
            id=str(existing.pk),
            offset=existing.offset,
        )
    if checksum and not existing.checksum:
        # The client now knows the digest it did not declare before: verify against it at the end.
        UploadSession.objects.filter(pk=existing.pk, checksum="").update(checksum=checksum)
        existing.checksum = checksum
    return existing


def _validate_size(size: object) -> int:
    # JSON gives ints; bool is an int subclass and must not pass as 0/1.
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest("size must be a non-negative integer (bytes).")
    if size > BIGINT_MAX:
        # RELIABILITY F9: past the bigint column is malformed input (400), not merely too large.
        raise InvalidRequest(f"size must be at most {BIGINT_MAX} (a signed 64-bit integer).")
    if size > conf.MAX_SIZE:
        raise TooLarge(f"size exceeds the maximum upload size of {conf.MAX_SIZE} bytes.")
    return size


def _create_empty(upload: UploadSession) -> None:
    if upload.checksum and upload.checksum != f"sha256:{EMPTY_SHA256}":
        raise ChecksumMismatch("An empty file cannot match the declared checksum.")
    upload.file = storage.create_empty_final(upload.id, upload.filename)
    upload.sha256 = EMPTY_SHA256
    upload.status = Status.COMPLETE
    upload.completed_at = upload.created_at
    upload.expires_at = _expiry_when_complete(upload, upload.created_at)
    upload.save(force_insert=True)
    transaction.on_commit(lambda: progress.record(upload, 0))


# --- Appending ----------------------------------------------------------------------------------


class _ClientGone(Exception):
    """Reading the request body failed: the client disconnected or timed out."""


@dataclass
class _Append:
    """The state of one request's write: what is on disk and what is committed."""

    upload: UploadSession
    writer: storage.PartialWriter
    committed: int
    # The SHA-256 of every byte written so far, when this worker held the upload's digest.
    running: digests.Running | None = None
    last_commit_at: float = field(default_factory=time.monotonic)
    # Read once per request, not per block: every block of every chunk passes through `due`.
    commit_bytes: int = field(default_factory=lambda: conf.COMMIT_BYTES)
    commit_interval: float = field(default_factory=lambda: conf.COMMIT_INTERVAL)

    def write(self, block: bytes) -> None:
        self.writer.write(block)
        if self.running is not None:
            self.running.update(block)

    def commit(self, *, release: locks.Held | None = None) -> None:
        """fsync the bytes written so far, then record them (DB, then Redis, then the digest).

        `release`: the request writes nothing more, so the upload's lock may be released in the
        same round trip as the commit (on PostgreSQL). The file is closed first: whoever takes the
        lock next is then the only writer with the file open (RELIABILITY INV7).
        """
        if self.writer.position == self.committed:
            return
        # With the running digest kept, nothing reads these bytes again before they are moved.
        self.writer.sync(drop_cached=self.running is not None)
        crash_point("after_fsync")
        if release is not None:
            self.writer.close()
        _commit_offset(self.upload, old=self.committed, new=self.writer.position, release=release)
        self.committed = self.writer.position
        self.last_commit_at = time.monotonic()
        if self.running is not None:
            digests.record(self.upload.pk, self.committed, self.running.settled())

    def due(self) -> bool:
        return (
            self.writer.position - self.committed >= self.commit_bytes
            or time.monotonic() - self.last_commit_at >= self.commit_interval
        )


def upload_append(
    *,
    upload: UploadSession,
    offset: int,
    stream: BinaryIO,
    length: int | None,
    digest: ChunkDigest | None = None,
    declare_size: int | None = None,
    held: locks.Held | None = None,
) -> UploadSession:
    """Append the bytes read from `stream` at `offset`; finalize when the last byte lands.

    `length` is the body's declared length, or None for a body that runs to its end (a chunked
    request), which may not run past the upload's size. `declare_size` sets a deferred size (tus
    creation-defer-length) before the bytes are written.

    Without a `digest`, progress is committed as the body streams and an interrupted body keeps
    what was durably received (IncompleteBody carries the new offset). With a digest the request
    is all or nothing: it is verified before anything is committed. `held`: the upload's lock,
    taken with `upload` read under it (`selectors.upload_read_with(lock_for=...)`), adopted here.
    """
    with locks.upload_lock(upload.pk, reload=upload, held=held) as held:
        if upload.concat_final:
            raise FinalNotWritable()
        _check_writable(upload)
        if offset != upload.offset:
            # RELIABILITY B4: the client may have taken its offset from a Redis value ahead of the
            # database; put the committed offset (read under the lock) back so the cache trails it.
            committed = upload.offset
            transaction.on_commit(lambda: progress.record(upload, committed))
            raise OffsetMismatch(
                f"The upload's offset is {upload.offset}, not {offset}; send from {upload.offset}.",
                offset=upload.offset,
            )
        size = _checked_size(upload, declare_size) if declare_size is not None else upload.size
        limit = size if size is not None else conf.MAX_SIZE
        if length is not None and offset + length > limit:
            raise TooLarge(
                f"The chunk ends at byte {offset + length}, beyond the "
                + (f"declared size {size}." if size is not None else f"maximum size {limit}."),
                offset=upload.offset,
            )
        if size != upload.size:
            _save_size(upload, size)  # only once the request is known to fit
        try:
            if length != 0:
                _write(upload, stream=stream, length=length, limit=limit, digest=digest, held=held)
            if upload.offset == upload.size:
                _finalize(upload)
        except DataLost as exc:
            _fail(upload, exc.detail)
            raise
    crash_point("before_response")
    return upload


def upload_lock_release(held: locks.Held) -> None:
    """Release an upload's lock taken ahead for a chunk (`selectors.upload_read_with(lock_for=...)`)
    whose request ended without `upload_append` adopting it; nothing if it was released already."""
    locks.release(held)


def _checked_size(upload: UploadSession, size: int) -> int:
    """A deferred size being declared: valid, and fixed once (the same size again is a retry)."""
    if upload.size is not None:
        if upload.size == size:
            return size
        raise InvalidRequest(f"The upload's size is already {upload.size}; it cannot change to {size}.")
    size = _validate_size(size)
    if size < upload.offset:
        raise InvalidRequest(
            f"The declared size {size} is smaller than the {upload.offset} bytes already received.",
            offset=upload.offset,
        )
    return size


def _save_size(upload: UploadSession, size: int) -> None:
    updated = UploadSession.objects.filter(pk=upload.pk, size__isnull=True, status=Status.PARTIAL).update(
        size=size, updated_at=timezone.now()
    )
    if updated != 1:
        _raise_fenced(upload)
    upload.size = size


def upload_confirm_last_chunk(
    *, upload: UploadSession, offset: int, stream: BinaryIO, length: int | None
) -> UploadSession:
    """A chunk for an upload that is already complete (TUS.md D8). If it is exactly the upload's
    last bytes, already stored, it is a retry whose answer was lost: the upload is returned and the
    client gets the success it missed. Anything else (a writer that lost the race for the last
    bytes with other bytes, a chunk from the middle) is told the upload is complete (409).
    """
    selectors.upload_reload(upload)
    ends_at_size = length is None or offset + length == upload.size
    if not (
        upload.status == Status.COMPLETE
        and offset <= upload.size
        and ends_at_size
        and storage.final_ends_with(upload.file, offset, stream)
    ):
        raise UploadComplete(
            "The upload is already complete; this chunk is not the end of what it holds.",
            offset=upload.offset, status=upload.status,
        )
    return upload


def upload_for_resume(
    *, user: AbstractBaseUser, upload_id: uuid.UUID | str, looked: tuple[bool, UploadSession | None] | None = None
) -> UploadSession:
    """The caller's upload as a client about to resume it must see it (tus HEAD, TUS.md C7).

    When no request is writing to it, that is the row as read: one look at the lock, made before
    the read so that a writer which started earlier is seen, then the read (one round trip on
    PostgreSQL). Otherwise (a writer holds it, perhaps on a half-open connection, or a crashed
    finalize is owed) see `upload_settle`. `looked`: that look and read, made already (with the
    request's token, `selectors.upload_read_with`); the owner is checked here.
    """
    if looked is None:
        busy, upload = selectors.upload_look_and_get_for_user(user=user, upload_id=upload_id)
    else:
        busy, upload = looked[0], selectors.upload_owned_by(looked[1], user=user)
    owed = upload.status == Status.PARTIAL and upload.offset == upload.size and not upload.concat_final
    return upload_settle(upload=upload) if busy or owed else upload


def upload_settle(*, upload: UploadSession) -> UploadSession:
    """The upload's committed state with no request writing to it (tus HEAD, TUS.md C7 and N7).

    A request still streaming into the upload (often a half-open connection) is asked to stop and
    commit what it durably has, so the offset returned is the one the next append must start at.
    An upload whose last byte is committed but that was never finalized (a crash in between) is
    finalized here, so a client told "offset == size" is never left with an unfinished upload.
    Finishing it may fail it (a wrong declared checksum, bytes missing on disk): that is then the
    state returned, as every later read returns it, not an error of this read.
    `upload` is the caller's fresh read of the row (it is read again under the lock).
    """
    if upload.status != Status.PARTIAL:
        return upload
    with locks.upload_lock(upload.pk, reload=upload):
        if upload.status == Status.PARTIAL and upload.offset == upload.size and not upload.concat_final:
            try:
                _finalize(upload)
            except ChecksumMismatch:
                pass  # _finalize failed the upload and recorded why
            except DataLost as exc:
                _fail(upload, exc.detail)
            selectors.upload_reload(upload)
    return upload


def _check_writable(upload: UploadSession) -> None:
    if upload.status == Status.COMPLETE:
        raise UploadComplete(offset=upload.offset, status=upload.status)
    if upload.status in (Status.FAILED, Status.EXPIRED):
        raise UploadGone(f"The upload is {upload.status}; start a new one.", status=upload.status)
    if upload.expires_at is not None and upload.expires_at <= timezone.now():
        _expire_locked(upload)
        raise UploadGone("The upload expired; start a new one.", status=upload.status)


def _write(
    upload: UploadSession,
    *,
    stream: BinaryIO,
    length: int | None,
    limit: int,
    digest: ChunkDigest | None,
    held: locks.Held | None = None,
) -> None:
    """Stream the body into the partial file, committing as it goes (see the module docstring).

    With `length` None the body runs until its end, and must end by `limit`: a longer body is
    refused (413) and its unacknowledged tail dropped, so nothing lands past the upload's size.
    `held`: the upload's lock, released by the last commit unless that completes the upload
    (finalizing needs the lock still).
    """
    hasher = hashlib.new(digest.algorithm) if digest else None
    with (
        storage.PartialWriter(upload.pk, upload.offset) as writer,
        digests.running(upload.pk, upload.offset) as running,
    ):
        start = upload.offset
        end = start + length if length is not None else limit
        state = _Append(upload=upload, writer=writer, committed=start, running=running)
        block_size = conf.BLOCK_SIZE
        crash_point("before_write")
        try:
            with locks.release_on_request(
                upload.pk, getattr(stream, "interrupt", None),
                stalled=getattr(stream, "stalled", None), cut=getattr(stream, "cut", None),
            ):
                while writer.position < end:
                    block = _read(stream, min(block_size, end - writer.position))
                    if not block:
                        break
                    state.write(block)
                    crash_point("mid_body")
                    if hasher is not None:
                        hasher.update(block)
                    elif writer.position < end and state.due():
                        # Never at `end`: a longer-than-allowed body must still be refusable whole.
                        state.commit()
                overflow = length is None and writer.position == end and _read(stream, 1)
        except _ClientGone:
            _keep_or_discard(state, keep=hasher is None)
            raise _interrupted(stream, state, start) from None
        except (StorageFull, StorageFailure):
            # The tail past the committed offset is unknown (RELIABILITY X6, D4): drop it.
            writer.truncate(state.committed)
            raise
        if getattr(stream, "interrupted", False) and writer.position < end:
            _keep_or_discard(state, keep=hasher is None)
            raise _interrupted(stream, state, start)
        if getattr(stream, "cut_off", False) and writer.position < end:
            _keep_or_discard(state, keep=hasher is None)
            raise IncompleteBody(
                f"The body made no progress for {conf.BODY_TIMEOUT:g} s; the request ended after "
                f"{writer.position - start} bytes.",
                offset=state.committed,
            )
        if overflow:
            writer.truncate(state.committed)
            raise TooLarge(
                f"The body runs past byte {limit}, the upload's "
                + ("size" if upload.size is not None else "maximum size")
                + "; the bytes after the last commit were discarded.",
                offset=state.committed,
            )
        if length is not None and writer.position < end:
            _keep_or_discard(state, keep=hasher is None)
            raise IncompleteBody(
                f"The body ended after {writer.position - start} of {length} bytes.",
                offset=state.committed,
            )
        crash_point("after_write")
        if hasher is not None and not hmac.compare_digest(hasher.digest(), digest.expected):
            writer.truncate(state.committed)
            raise ChecksumMismatch(
                "The chunk does not match its checksum; it was discarded.", offset=state.committed
            )
        try:
            state.commit(release=held if writer.position != upload.size else None)
        except (StorageFull, StorageFailure):
            writer.truncate(state.committed)
            raise


def _interrupted(stream: BinaryIO, state: _Append, start: int) -> UploadError:
    if getattr(stream, "interrupted", False):
        return UploadReleased(
            f"A newer request for this upload took over; this one stopped after {state.committed - start} "
            f"bytes. Continue from offset {state.committed}.",
            offset=state.committed,
        )
    return IncompleteBody("The connection broke before the whole chunk arrived.", offset=state.committed)


def _keep_or_discard(state: _Append, *, keep: bool) -> None:
    """After an interrupted body: make the received prefix durable, or drop it."""
    if keep:
        try:
            state.commit()
            return
        except UploadError:
            pass
    state.writer.truncate(state.committed)


def _read(stream: BinaryIO, size: int) -> bytes:
    try:
        return stream.read(size)
    except Exception as exc:  # noqa: BLE001 - every server raises its own kind on a broken body
        raise _ClientGone() from exc


# How far the stored expiry may lag behind "now + UPLOADS_EXPIRY" before a commit moves it.
EXPIRY_STEP = timedelta(seconds=60)


def _renewed_expiry(upload: UploadSession, now: datetime) -> datetime:
    """The expiry a commit at `now` stores: `now + UPLOADS_EXPIRY`, or the stored one while it is
    less than `EXPIRY_STEP` (at most 1 % of UPLOADS_EXPIRY) behind that.

    `expires_at` is indexed (cleanup finds expired uploads by it), and PostgreSQL can update a row
    in place, without a new entry in every index of the table (a HOT update), only when no indexed
    column changes. Renewed on every commit, it made every chunk's UPDATE add an entry to each
    index; now that happens at most once a minute per upload, and an upload still expires no
    earlier than `UPLOADS_EXPIRY` minus that step after its last chunk.
    """
    expiry = conf.EXPIRY
    renewed = now + expiry
    step = min(EXPIRY_STEP, expiry / 100)
    if upload.expires_at is not None and upload.expires_at <= renewed < upload.expires_at + step:
        return upload.expires_at
    return renewed


def _commit_offset(upload: UploadSession, *, old: int, new: int, release: locks.Held | None = None) -> None:
    """Move the committed offset from `old` to `new`, only if nobody else moved it meanwhile;
    then release `release`, the upload's lock, if given (see `locks.commit_offset`)."""
    now = timezone.now()
    expires_at = _renewed_expiry(upload, now)
    updated = locks.commit_offset(
        upload.pk, old=old, new=new, now=now, expires_at=expires_at, durable=conf.FSYNC, then_release=release
    )
    if updated is None:
        # One conditional UPDATE is atomic by itself: no BEGIN/COMMIT round trips on the hot path.
        # Composed once (`rows`): it runs at every commit of every chunk.
        updated = rows.update(
            UploadSession,
            values={"offset": new, "updated_at": now, "expires_at": expires_at},
            where={"pk": upload.pk, "offset": old, "status": Status.PARTIAL},
        )
    if updated != 1:
        _raise_fenced(upload)
    crash_point("after_commit")
    # Redis only after the commit: at once in autocommit, or when an enclosing transaction commits.
    transaction.on_commit(lambda: progress.record(upload, new))
    crash_point("after_redis")
    upload.offset, upload.updated_at, upload.expires_at = new, now, expires_at


def _raise_fenced(upload: UploadSession) -> None:
    current = UploadSession.objects.filter(pk=upload.pk).values("offset", "status").first()
    if current is None or current["status"] != Status.PARTIAL:
        raise UploadGone("The upload was cancelled or ended while this chunk was being received.")
    raise OffsetMismatch("Another request moved the offset.", offset=current["offset"])


# --- tus concatenation ------------------------------------------------------------------------


def upload_concatenate(
    *,
    owner: AbstractBaseUser,
    part_ids: Sequence[uuid.UUID],
    filename: object | None = None,
    metadata: str = "",
    concat: str = "",
) -> UploadSession:
    """Create a tus final upload: the owner's finished partial uploads joined in the given order.

    The parts are streamed through the same write path as any chunk (the final's own partial file,
    fsync, committed offsets) and the result is finalized like any other upload. Parts are kept
    (and may be reused) until their expiry window ends. Raises InvalidRequest for a part that is
    unknown, not a partial upload, or unfinished (we do not offer concatenation-unfinished).
    """
    if not part_ids:
        raise InvalidRequest("Upload-Concat: final needs at least one partial upload.")
    parts = []
    for part_id in part_ids:
        try:
            part = selectors.upload_get_for_user(user=owner, upload_id=part_id)
        except UploadError:
            raise InvalidRequest(f"Upload-Concat names {part_id}, which is not one of your uploads.") from None
        if not part.concat_partial:
            raise InvalidRequest(f"Upload {part_id} was not created with 'Upload-Concat: partial'.")
        if part.status != Status.COMPLETE:
            raise InvalidRequest(f"Partial upload {part_id} is not finished ({part.offset}/{part.size} bytes).")
        parts.append(part)
    size = sum(part.size for part in parts)
    if size > conf.MAX_SIZE:
        raise TooLarge(f"The parts add up to {size} bytes, over the maximum upload size of {conf.MAX_SIZE}.")
    final = upload_create_tus(owner=owner, filename=filename, size=size, metadata=metadata, concat=concat)
    if final.status == Status.COMPLETE:
        return final  # parts of zero bytes
    with locks.upload_lock(final.pk):
        try:
            with storage.open_concatenation([part.file for part in parts]) as stream:
                _write(final, stream=stream, length=size, limit=size, digest=None)
            _finalize(final)
        except UploadError as exc:
            _fail(final, f"Concatenation failed: {exc.detail}")
            raise
    return final


# --- Completion ---------------------------------------------------------------------------------


def _finalize(upload: UploadSession) -> None:
    """Verify and publish a fully received upload. Call with the upload's lock held.

    Idempotent: after a crash at any step, calling it again finishes the job exactly once.
    """
    name = storage.final_name(upload.pk, upload.filename)
    on_disk = storage.partial_size(upload.pk)
    if on_disk is not None:
        if on_disk != upload.size:
            # Fewer bytes than acknowledged (or a stray tail): never publish a wrong-length file.
            raise DataLost(f"{on_disk} bytes are on disk for an upload of {upload.size}; start a new upload.")
        # The digest this worker kept while writing, else the file hashed cold (see digests.py).
        sha256 = digests.take(upload.pk, upload.size) or storage.sha256_of_partial(upload.pk)
    else:
        # An earlier attempt moved the file but died before recording it (RELIABILITY A3).
        try:
            sha256 = storage.sha256_of_final(name)
        except FileNotFoundError as exc:
            raise DataLost("The data of this upload is missing; start a new upload.") from exc
    if upload.checksum and upload.checksum != f"sha256:{sha256}":
        _fail(upload, f"SHA-256 {sha256} does not match the declared checksum.", final_name=name)
        raise ChecksumMismatch(
            "The file's SHA-256 does not match the declared checksum; the upload failed.",
            status=Status.FAILED,
        )
    crash_point("finalize_before_rename")
    name = storage.publish(upload.pk, upload.filename)
    crash_point("finalize_after_rename")
    now = timezone.now()
    with transaction.atomic():
        updated = UploadSession.objects.filter(
            pk=upload.pk, status=Status.PARTIAL, offset=upload.size
        ).update(
            status=Status.COMPLETE,
            file=name,
            sha256=sha256,
            completed_at=now,
            updated_at=now,
            expires_at=_expiry_when_complete(upload, now),
        )
        if updated != 1:
            _raise_fenced(upload)
        transaction.on_commit(lambda: progress.record(upload, upload.size))
    crash_point("finalize_after_commit")
    selectors.upload_reload(upload)
    logger.info("upload %s complete: %s (%d bytes)", upload.pk, upload.filename, upload.size)


def _expiry_when_complete(upload: UploadSession, now: datetime) -> datetime | None:
    """Completed uploads never expire, except the parts of a tus concatenation: they are building
    blocks, kept for reuse (TUS.md K10) for the expiry window, then cleaned up."""
    return now + conf.EXPIRY if upload.concat_partial else None


def _fail(upload: UploadSession, reason: str, *, final_name: str = "") -> None:
    storage.delete_partial(upload.pk)
    if final_name:
        storage.delete_final(final_name)
    now = timezone.now()
    UploadSession.objects.filter(pk=upload.pk).update(
        status=Status.FAILED, error=reason[:255], updated_at=now, expires_at=None
    )
    progress.forget(upload)
    selectors.upload_reload(upload)
    logger.warning("upload %s failed: %s", upload.pk, reason)


# --- Ending uploads -----------------------------------------------------------------------------


def upload_delete(*, upload: UploadSession) -> None:
    """Remove the upload, its partial or final file and its running total."""
    with locks.upload_lock(upload.pk):
        storage.delete_partial(upload.pk)
        current = UploadSession.objects.filter(pk=upload.pk).values_list("file", flat=True).first()
        if current:
            storage.delete_final(current)
        UploadSession.objects.filter(pk=upload.pk).delete()
        progress.forget(upload)


def upload_abort(*, upload: UploadSession, reason: str = "Aborted.") -> UploadSession:
    """Stop an unfinished upload: its partial file goes, the row stays as failed (for the record)."""
    with locks.upload_lock(upload.pk, reload=upload):
        if upload.status == Status.PARTIAL:
            _fail(upload, reason)
    return upload


def _expire_locked(upload: UploadSession) -> None:
    storage.delete_partial(upload.pk)
    if upload.status == Status.COMPLETE:
        storage.delete_final(upload.file)  # only a concatenation part past its keep-alive window
    # A crash here leaves a row past its expiry with no data: read as expired, and expired again
    # by the next cleanup (RELIABILITY L3).
    crash_point("expire_after_delete")
    UploadSession.objects.filter(pk=upload.pk, status=upload.status).update(
        status=Status.EXPIRED, updated_at=timezone.now()
    )
    progress.forget(upload)
    selectors.upload_reload(upload)


def upload_expire(*, upload: UploadSession) -> bool:
    """Expire an idle partial upload, or a concatenation part past its window.

    Skips (returns False) one that a request is writing to: cleanup never interrupts a client.
    """
    try:
        with locks.upload_lock(upload.pk, timeout=0, ask_release=False, reload=upload):
            expirable = upload.status == Status.PARTIAL or (
                upload.status == Status.COMPLETE and upload.concat_partial
            )
            if not expirable or upload.expires_at is None:
                return False
            if upload.expires_at > timezone.now():
                return False  # renewed by a chunk since it was selected
            _expire_locked(upload)
            return True
    except UploadError:
        return False


@dataclass
class CleanupReport:
    expired: list[UploadSession] = field(default_factory=list)
    skipped_busy: list[UploadSession] = field(default_factory=list)
    orphaned_files: list[str] = field(default_factory=list)


def uploads_cleanup(*, dry_run: bool = False) -> CleanupReport:
    """Expire idle partial uploads and delete partial files no unfinished upload owns.

    Completed uploads are never touched. Safe to run again after being killed half-way.
    """
    report = CleanupReport()
    for upload in selectors.uploads_expired():
        if dry_run:
            report.expired.append(upload)
        elif upload_expire(upload=upload):
            report.expired.append(upload)
        else:
            report.skipped_busy.append(upload)

    # Files younger than the expiry window may belong to an upload being created right now.
    stale = list(storage.stale_partial_files(older_than_seconds=conf.EXPIRY.total_seconds()))
    live = selectors.upload_ids_partial([upload_id for upload_id, _ in stale if upload_id])
    for upload_id, path in stale:
        if upload_id in live:
            continue
        report.orphaned_files.append(str(path))
        if not dry_run:
            storage.remove_file(path)
    return report
