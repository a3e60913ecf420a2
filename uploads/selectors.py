"""Read-only queries. Writes live in services.py."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import F, Q, QuerySet, Sum
from django.utils import timezone

from . import locks, rows
from .exceptions import UploadNotFound
from .models import Protocol, Status, UploadSession


def uploads_for_user(*, user: AbstractBaseUser) -> QuerySet[UploadSession]:
    return UploadSession.objects.filter(owner=user).order_by("-created_at")


def _upload_id(upload_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return upload_id if isinstance(upload_id, uuid.UUID) else uuid.UUID(str(upload_id))
    except ValueError as exc:
        raise UploadNotFound() from exc  # not an id at all


def upload_get_for_user(*, user: AbstractBaseUser, upload_id: uuid.UUID | str) -> UploadSession:
    """The caller's upload; another user's upload is "not found", so ids leak nothing (RELIABILITY K1).

    Every chunk and look-up starts here, so the statement is composed once (`rows`).
    """
    upload = rows.get(UploadSession, pk=_upload_id(upload_id), owner=user.pk)
    if upload is None:
        raise UploadNotFound()
    return upload


def upload_owned_by(upload: UploadSession | None, *, user: AbstractBaseUser) -> UploadSession:
    """An upload read by other means, if it is the caller's; not found as in `upload_get_for_user`."""
    if upload is None or upload.owner_id != user.pk:
        raise UploadNotFound()
    return upload


def upload_look_and_get_for_user(*, user: AbstractBaseUser, upload_id: uuid.UUID | str) -> tuple[bool, UploadSession]:
    """Whether a request holds the upload's lock, then the caller's upload as committed after that
    look (`locks.look_and_read`); not found as in `upload_get_for_user`."""
    held, upload = locks.look_and_read(_upload_id(upload_id))
    return held, upload_owned_by(upload, user=user)


def upload_read_with(
    read: Callable[..., list | None],
    *,
    upload_id: uuid.UUID | str,
    look: bool = False,
    lock_for: rows.Column | None = None,
) -> tuple[bool | locks.Held | None, UploadSession | None] | None:
    """The upload's row, whoever owns it, through `read`: a `rows.together` that reads other rows in
    the same statement (the request's token: `authentication.read_with_token`). With `look`,
    whether its lock is held too, looked at before the read (`locks.look_and_read`); else False.
    With `lock_for` (the column of `read`'s token naming its user), its lock instead, taken if that
    user owns it and it is unfinished, or None (`locks.lock_and_read_with`).
    None if `read` read nothing, or `upload_id` is not an id. Check the owner before use
    (`upload_owned_by`)."""
    try:
        upload_id = _upload_id(upload_id)
    except UploadNotFound:
        return None
    if lock_for is not None:
        return locks.lock_and_read_with(read, upload_id, owner=lock_for)
    if look:
        return locks.look_and_read_with(read, upload_id)
    results = read(rows.Part(UploadSession, equals=(("pk", upload_id),)))
    return None if results is None else (False, results[0])


def upload_reload(upload: UploadSession) -> None:
    """Read the upload's row again into `upload`: `refresh_from_db`, composed once (see `rows`).
    The engine's one way to re-read, under the lock on every chunk and after its own writes."""
    rows.reload(upload)


def upload_partial_by_name(*, user: AbstractBaseUser, filename: str, size: int) -> UploadSession | None:
    """The caller's unfinished REST upload of this file name and size (the seed's resume by name).

    There is at most one (a partial unique constraint); it may be past its expiry time if the
    cleanup command has not run yet. tus uploads are resumed by URL only.
    """
    return (
        uploads_for_user(user=user)
        .filter(filename=filename, size=size, status=Status.PARTIAL, protocol=Protocol.REST)
        .first()
    )


def upload_effective_status(upload: UploadSession, *, now: datetime | None = None) -> str:
    """The status a client sees: an idle partial upload past its expiry is expired, even before
    the cleanup command has marked it (and any write to it would be refused with 410)."""
    expired = upload.expires_at is not None and upload.expires_at <= (now or timezone.now())
    return Status.EXPIRED if upload.status == Status.PARTIAL and expired else upload.status


def uploads_with_effective_status(
    queryset: QuerySet[UploadSession], status: str, *, now: datetime | None = None
) -> QuerySet[UploadSession]:
    """Filter by the status `upload_effective_status` reports, so lists and details agree."""
    now = now or timezone.now()
    if status == Status.PARTIAL:
        return queryset.filter(status=Status.PARTIAL, expires_at__gt=now)
    if status == Status.EXPIRED:
        return queryset.filter(Q(status=Status.EXPIRED) | Q(status=Status.PARTIAL, expires_at__lte=now))
    return queryset.filter(status=status)


def uploads_expired(*, now: datetime | None = None) -> QuerySet[UploadSession]:
    """Idle partial uploads past their expiry, and tus concatenation parts past their keep window."""
    return UploadSession.objects.filter(
        Q(status=Status.PARTIAL) | Q(status=Status.COMPLETE, tus_concat="partial"),
        expires_at__lte=now or timezone.now(),
    )


def upload_ids_existing(ids: list[uuid.UUID]) -> set[uuid.UUID]:
    return set(UploadSession.objects.filter(pk__in=ids).values_list("pk", flat=True))


def upload_ids_partial(ids: list[uuid.UUID]) -> set[uuid.UUID]:
    return set(
        UploadSession.objects.filter(pk__in=ids, status=Status.PARTIAL).values_list("pk", flat=True)
    )


def upload_bytes_claimed(*, user: AbstractBaseUser | None = None) -> int:
    """Bytes that unfinished uploads (of `user`, or everyone's) have yet to receive."""
    queryset = UploadSession.objects.filter(status=Status.PARTIAL, size__isnull=False)
    if user is not None:
        queryset = queryset.filter(owner=user)
    return queryset.aggregate(claimed=Sum(F("size") - F("offset")))["claimed"] or 0
