"""Management commands: cleanup_uploads and create_dev_user."""
from __future__ import annotations

import io
import os
import time
import uuid
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from uploads import services, storage
from uploads.conf import conf
from uploads.models import Status, UploadSession

pytestmark = pytest.mark.django_db


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _partial(user, name: str, data: bytes = b"x" * 10, size: int = 100) -> UploadSession:
    upload, _ = services.upload_create(owner=user, filename=name, size=size)
    return services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))


def _age(upload: UploadSession) -> None:
    UploadSession.objects.filter(pk=upload.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_cleanup_dry_run_changes_nothing(user):
    old = _partial(user, "old.bin")
    _age(old)
    output = _run("cleanup_uploads", "--dry-run")
    assert f"Would expire {old.pk}" in output
    old.refresh_from_db()
    assert old.status == Status.PARTIAL
    assert storage.partial_size(old.pk) == 10


def test_cleanup_expires_idle_partials_and_keeps_the_rest(user):
    old = _partial(user, "old.bin")
    fresh = _partial(user, "fresh.bin")
    done, _ = services.upload_create(owner=user, filename="done.bin", size=3)
    done = services.upload_append(upload=done, offset=0, stream=io.BytesIO(b"abc"), length=3)
    _age(old)
    # A completed upload past any date is still never touched.
    UploadSession.objects.filter(pk=done.pk).update(updated_at=timezone.now() - timedelta(days=30))

    output = _run("cleanup_uploads")

    assert "Expired 1 upload(s)" in output
    for upload in (old, fresh, done):
        upload.refresh_from_db()
    assert old.status == Status.EXPIRED and storage.partial_size(old.pk) is None
    assert fresh.status == Status.PARTIAL and storage.partial_size(fresh.pk) == 10
    assert done.status == Status.COMPLETE and storage.final_storage().exists(done.file)
    # Idempotent: a second run (say after the first was killed) finds nothing more to do.
    assert "Expired 0 upload(s)" in _run("cleanup_uploads")


def test_cleanup_deletes_orphaned_partial_files(user):
    live = _partial(user, "live.bin")
    orphan = storage.partial_path(uuid.uuid4())
    orphan.write_bytes(b"left behind by a crash")
    stranger = storage.partial_dir() / "not-an-upload.tmp"
    stranger.write_bytes(b"?")
    old = time.time() - conf.EXPIRY.total_seconds() - 60
    for path in (orphan, stranger, storage.partial_path(live.pk)):
        os.utime(path, (old, old))

    output = _run("cleanup_uploads")

    assert str(orphan) in output
    assert not orphan.exists() and not stranger.exists()
    # An unfinished upload's file is never an orphan, however old.
    assert storage.partial_size(live.pk) == 10


def test_create_dev_user_prints_credentials_once(settings, tmp_path, django_user_model):
    settings.DEBUG = True
    credentials = tmp_path / "creds"
    first = _run("create_dev_user", "--credentials-file", str(credentials))
    assert "password:" in first and "API token" in first
    user = django_user_model.objects.get(username="admin")
    assert user.is_superuser
    password = first.split("password: ")[1].split()[0]
    assert user.check_password(password)
    assert password in credentials.read_text()
    second = _run("create_dev_user", "--credentials-file", str(credentials))
    assert "already exists" in second and password not in second


def test_create_dev_user_refuses_without_debug(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError):
        call_command("create_dev_user")
