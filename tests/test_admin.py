"""The admin (uploads/admin.py): a read-only list and detail page, abort and delete through services.

Uploads are made through the real services, so real partial and final files and real Redis totals
exist; listing tests seed rows with bulk_create where only the numbers matter.
"""
from __future__ import annotations

import copy
import io
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import Permission
from django.db import connection
from django.http import HttpResponse
from django.template.defaultfilters import filesizeformat
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from uploads import locks, progress, services, storage
from uploads.models import Status, UploadSession

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:uploads_uploadsession_changelist")
HOSTILE_NAME = '"><img src=x onerror=alert(1)>.png'
MiB = 1024 * 1024


# --- Helpers --------------------------------------------------------------------------------------


def change_url(upload: UploadSession) -> str:
    return reverse("admin:uploads_uploadsession_change", args=[upload.pk])


def delete_url(upload: UploadSession) -> str:
    return reverse("admin:uploads_uploadsession_delete", args=[upload.pk])


def download_url(upload: UploadSession) -> str:
    return reverse("admin:uploads_uploadsession_download", args=[upload.pk])


def column(response: HttpResponse, name: str) -> list[str]:
    """The inner HTML of one list column, row by row, in page order."""
    return re.findall(rf'<t[dh] class="field-{name}[^"]*">(.*?)</t[dh]>', response.content.decode(), re.S)


def row_of(response: HttpResponse, upload: UploadSession) -> str:
    """The HTML of the list row holding `upload`."""
    html = response.content.decode()
    match = re.search(rf'<tr>(?:(?!</tr>).)*value="{upload.pk}"(?:(?!</tr>).)*</tr>', html, re.S)
    assert match, f"{upload.pk} is not listed"
    return match.group(0)


def messages_of(response: HttpResponse) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def make_upload(owner: AbstractBaseUser, filename: str, data: bytes, received: int | None = None) -> UploadSession:
    """An upload made through the services: `received` bytes of `data` stored (all by default)."""
    upload, created = services.upload_create(owner=owner, filename=filename, size=len(data))
    assert created
    received = len(data) if received is None else received
    if received:
        services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data[:received]), length=received)
    upload.refresh_from_db()
    return upload


def final_path(upload: UploadSession) -> Path:
    return Path(storage.final_storage().path(upload.file))


def seed(owner: AbstractBaseUser, count: int, **fields: object) -> list[UploadSession]:
    """`count` rows of partial uploads, half received, with distinct names (so distinct Redis keys)."""
    now = timezone.now()
    rows = [
        UploadSession(
            id=uuid.uuid4(),
            owner=owner,
            filename=f"file-{index:05}.bin",
            size=2 * MiB,
            offset=MiB,
            created_at=now - timedelta(seconds=index),
            updated_at=now,
            expires_at=now + timedelta(days=1),
            **fields,
        )
        for index in range(count)
    ]
    return UploadSession.objects.bulk_create(rows)


def snapshot(upload: UploadSession) -> dict[str, object]:
    return UploadSession.objects.filter(pk=upload.pk).values().get()


@pytest.fixture(params=["refused", "silent"])
def unreachable_redis(request, settings) -> Iterator[None]:
    """Point the progress cache at a Redis that is down (connection refused) or hung (a socket that
    accepts connections and never answers), with short timeouts (RELIABILITY.md B1, N1)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accept(): the kernel completes connections, nothing ever replies
    port = silent.getsockname()[1] if request.param == "silent" else 1
    caches = copy.deepcopy(settings.CACHES)
    caches["uploads"]["LOCATION"] = f"redis://127.0.0.1:{port}/0"
    caches["uploads"]["OPTIONS"].update(SOCKET_CONNECT_TIMEOUT=0.2, SOCKET_TIMEOUT=0.2)
    settings.CACHES = caches
    progress.reset_backoff()
    yield
    silent.close()


@pytest.fixture
def staff_viewer(django_user_model) -> Client:
    """A staff member allowed to look at uploads and nothing more."""
    viewer = django_user_model.objects.create_user(
        username="viewer", password="viewer-password-1", is_staff=True
    )
    viewer.user_permissions.add(Permission.objects.get(codename="view_uploadsession"))
    client = Client()
    client.force_login(viewer)
    return client


@contextmanager
def lock_held_elsewhere(upload: UploadSession) -> Iterator[None]:
    """Hold the upload's lock from another thread, as a request streaming a chunk would.

    Another thread, because on PostgreSQL the lock is a session-level advisory lock, which the
    test's own connection could take again.
    """
    acquired, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with locks.upload_lock(upload.pk):
                acquired.set()
                release.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)
            acquired.set()
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert acquired.wait(10) and not errors, errors
        yield
    finally:
        release.set()
        thread.join(10)


# --- The list ---------------------------------------------------------------------------------------


def test_list_of_many_rows_reads_redis_once_per_page(
    admin_client, user, monkeypatch, django_assert_max_num_queries
):
    rows = seed(user, 200)
    for upload in rows:
        progress.record(upload, 1000 + int(upload.filename[5:10]))
    calls: list[int] = []
    real_read_many = progress.read_many

    def counting_read_many(uploads: Iterable[UploadSession]) -> dict:
        uploads = list(uploads)
        calls.append(len(uploads))
        return real_read_many(uploads)

    monkeypatch.setattr(progress, "read_many", counting_read_many)

    # A bounded number of queries too: the owner comes with the rows, not one query per row.
    with django_assert_max_num_queries(10):
        response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    assert calls == [100]  # one MGET for the whole page (N1)
    totals = column(response, "redis_total")
    assert len(totals) == 100
    # Newest first: file-00000 .. file-00099, each with the total Redis holds for it.
    assert totals[0] == '<span title="1000 bytes">1000\xa0bytes</span>'
    assert totals[99] == '<span title="1099 bytes">1.1\xa0KB</span>'
    assert "200 upload sessions" in response.content.decode()

    second_page = admin_client.get(CHANGELIST, {"p": 2})
    assert second_page.status_code == 200
    assert calls == [100, 100]
    assert column(second_page, "redis_total")[0] == '<span title="1100 bytes">1.1\xa0KB</span>'


def test_list_shows_progress_and_human_sizes(admin_client, user):
    partial = make_upload(user, "half.bin", b"h" * 3000, received=1260)
    almost = make_upload(user, "almost.bin", b"a" * 10_000, received=9_999)
    complete = make_upload(user, "done.bin", b"d" * 2048)
    empty = make_upload(user, "empty.txt", b"")

    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    row = row_of(response, partial)
    assert '<progress value="42.0" max="100"' in row
    assert "42.0%" in row
    assert (
        f'<span title="1260 bytes">{filesizeformat(1260)}</span> / '
        f'<span title="3000 bytes">{filesizeformat(3000)}</span>'
    ) in row
    assert filesizeformat(1260) == "1.2\xa0KB"
    assert "Partial" in row
    assert "alice" in row
    # A partial upload never reads 100%.
    assert "99.9%" in row_of(response, almost)
    assert "100.0%" in row_of(response, complete)
    assert "2.0\xa0KB</span> / " in row_of(response, complete)
    assert "100.0%" in row_of(response, empty)


def test_list_shows_redis_total_beside_the_database_one(
    admin_client, user, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        tracked = make_upload(user, "tracked.bin", b"t" * 5000, received=2048)
    untracked = seed(user, 1)[0]  # made behind the engine's back: Redis knows nothing of it

    response = admin_client.get(CHANGELIST)

    assert progress.read(tracked) == 2048
    row = row_of(response, tracked)
    redis_cell = re.search(r'class="field-redis_total">(.*?)</td>', row).group(1)
    assert redis_cell == '<span title="2048 bytes">2.0\xa0KB</span>'
    assert re.search(r'class="field-redis_total">(.*?)</td>', row_of(response, untracked)).group(1) == "—"


def test_list_flags_a_redis_total_ahead_of_the_database(admin_client, user):
    upload = make_upload(user, "ahead.bin", b"a" * 4000, received=1000)
    progress.record(upload, 3000)  # a stale snapshot restored into Redis (B4)

    response = admin_client.get(CHANGELIST)

    row = row_of(response, upload)
    assert '<span title="3000 bytes">2.9\xa0KB</span> <span title="Ahead of the database' in row
    # The database stays the truth for the progress shown.
    assert "25.0%" in row
    assert snapshot(upload)["offset"] == 1000


def test_list_and_detail_render_from_the_database_with_redis_unreachable(
    admin_client, user, unreachable_redis
):
    rows = seed(user, 200)

    started = time.monotonic()
    response = admin_client.get(CHANGELIST)
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert column(response, "redis_total") == ["—"] * 100
    assert all("50.0%" in cell for cell in column(response, "progress_bar"))
    # One bounded attempt for the page, not a timeout per row (N1 asks for < 1 s).
    assert elapsed < 1.0

    detail = admin_client.get(change_url(rows[0]))
    assert detail.status_code == 200
    assert "50.0%" in detail.content.decode()


def test_filters_by_status_and_owner(admin_client, user, other_user):
    partial = make_upload(user, "a.bin", b"a" * 100, received=10)
    complete = make_upload(user, "b.bin", b"b" * 100)
    bobs = make_upload(other_user, "c.bin", b"c" * 100, received=50)

    by_status = admin_client.get(CHANGELIST, {"status__exact": Status.COMPLETE})
    by_owner = admin_client.get(CHANGELIST, {"owner__id__exact": other_user.pk})
    page = admin_client.get(CHANGELIST).content.decode()

    assert [upload.pk for upload in by_status.context["cl"].result_list] == [complete.pk]
    assert [upload.pk for upload in by_owner.context["cl"].result_list] == [bobs.pk]
    assert partial.pk not in [upload.pk for upload in by_owner.context["cl"].result_list]
    # Owner choices list only users who have uploads.
    assert f'?owner__id__exact={other_user.pk}"' in page
    assert f'?owner__id__exact={user.pk}"' in page


def test_search_by_file_name_and_owner(admin_client, user, other_user):
    report = make_upload(user, "quarterly-report.pdf", b"r" * 100, received=1)
    make_upload(user, "holiday.jpg", b"h" * 100, received=1)
    bobs = make_upload(other_user, "notes.txt", b"n" * 100, received=1)

    by_name = admin_client.get(CHANGELIST, {"q": "report"})
    by_owner = admin_client.get(CHANGELIST, {"q": "bob"})

    assert [upload.pk for upload in by_name.context["cl"].result_list] == [report.pk]
    assert [upload.pk for upload in by_owner.context["cl"].result_list] == [bobs.pk]


def test_date_hierarchy_drills_down_by_creation_date(admin_client, user):
    old = seed(user, 1)[0]
    UploadSession.objects.filter(pk=old.pk).update(created_at=datetime(2020, 3, 4, 12, tzinfo=UTC))
    recent = make_upload(user, "recent.bin", b"r" * 10, received=1)

    response = admin_client.get(CHANGELIST, {"created_at__year": 2020})

    assert response.status_code == 200
    assert [upload.pk for upload in response.context["cl"].result_list] == [old.pk]
    assert recent.pk not in [upload.pk for upload in response.context["cl"].result_list]
    # The year links above the list.
    assert '<a href="?created_at__year=2020">2020</a>' in admin_client.get(CHANGELIST).content.decode()


# --- Escaping, access, read-only ------------------------------------------------------------------


def test_hostile_file_name_is_escaped_everywhere(admin_client, user):
    partial = make_upload(user, HOSTILE_NAME, b"p" * 100, received=40)
    complete = make_upload(user, HOSTILE_NAME, b"c" * 50)
    assert partial.filename == complete.filename == HOSTILE_NAME

    pages = {
        "list": admin_client.get(CHANGELIST),
        "search": admin_client.get(CHANGELIST, {"q": "img"}),
        "detail": admin_client.get(change_url(complete)),
        "delete": admin_client.get(delete_url(partial)),
        "delete selected": admin_client.post(
            CHANGELIST, {"action": "delete_selected", "_selected_action": [partial.pk, complete.pk]}
        ),
    }

    for name, response in pages.items():
        html = response.content.decode()
        assert response.status_code == 200, name
        assert "<img src=x" not in html, name
        assert "onerror=alert(1)>" not in html, name
        assert "&lt;img src=x onerror=alert(1)&gt;.png" in html, name
    assert UploadSession.objects.count() == 2


def test_non_staff_and_anonymous_are_sent_to_login(client, user):
    upload = make_upload(user, "mine.bin", b"m" * 10)
    before = snapshot(upload)
    urls = [CHANGELIST, change_url(upload), delete_url(upload), download_url(upload)]

    anonymous = [client.get(url) for url in urls]
    client.force_login(user)  # alice owns the upload but is not staff (K8)
    signed_in = [client.get(url) for url in urls]
    action = client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [upload.pk], "post": "yes"}
    )

    login = reverse("admin:login")
    for url, response in zip(urls + urls, anonymous + signed_in):
        assert response.status_code == 302
        assert response["Location"] == f"{login}?next={url}"
    assert action.status_code == 302
    assert action["Location"] == f"{login}?next={CHANGELIST}"
    assert snapshot(upload) == before
    assert final_path(upload).read_bytes() == b"m" * 10


def test_adding_is_refused(admin_client, user):
    add_url = reverse("admin:uploads_uploadsession_add")

    page = admin_client.get(add_url)
    post = admin_client.post(add_url, {"owner": user.pk, "filename": "x.bin", "size": 10, "offset": 0})

    assert page.status_code == 403
    assert post.status_code == 403
    assert not UploadSession.objects.exists()
    assert add_url not in admin_client.get(CHANGELIST).content.decode()


def test_change_page_is_read_only(admin_client, user):
    upload = make_upload(user, "report.pdf", b"r" * 1000, received=300)
    before = snapshot(upload)

    page = admin_client.get(change_url(upload))
    post = admin_client.post(
        change_url(upload),
        {"offset": 1000, "status": Status.COMPLETE, "filename": "other.pdf", "size": 1000, "_save": "Save"},
    )

    html = page.content.decode()
    assert page.status_code == 200
    assert "<input" not in re.sub(r'<input type="hidden"[^>]*>', "", html.split('id="uploadsession_form"')[1])
    assert 'name="_save"' not in html
    assert '<div class="readonly">300</div>' in html  # the offset, shown
    assert "30.0%" in html
    assert post.status_code == 403
    assert snapshot(upload) == before
    assert storage.partial_size(upload.pk) == 300


def test_staff_without_change_or_delete_permission_has_no_actions(staff_viewer, user):
    upload = make_upload(user, "keep.bin", b"k" * 100, received=10)
    before = snapshot(upload)

    page = staff_viewer.get(CHANGELIST)
    abort = staff_viewer.post(
        CHANGELIST, {"action": "abort_selected", "_selected_action": [upload.pk]}, follow=True
    )
    delete = staff_viewer.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [upload.pk], "post": "yes"}, follow=True
    )

    assert page.status_code == 200
    assert 'name="action"' not in page.content.decode()
    assert abort.status_code == delete.status_code == 200
    assert messages_of(abort) == messages_of(delete) == []  # no action exists for this user
    assert snapshot(upload) == before
    assert storage.partial_size(upload.pk) == 10


# --- Actions and deletion ---------------------------------------------------------------------------


def test_abort_action_deletes_partial_files_and_marks_them_failed(
    admin_client, admin_user, user, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        partial = make_upload(user, "stuck.bin", b"s" * 1000, received=400)
        complete = make_upload(user, "done.bin", b"d" * 500)
    complete_before = snapshot(complete)
    assert progress.read(partial) == 400

    response = admin_client.post(
        CHANGELIST, {"action": "abort_selected", "_selected_action": [partial.pk, complete.pk]}, follow=True
    )

    assert response.status_code == 200
    partial.refresh_from_db()
    assert partial.status == Status.FAILED
    assert partial.error == f"Aborted by {admin_user.get_username()}."
    assert partial.offset == 400  # the record of what had arrived stays
    assert storage.partial_size(partial.pk) is None
    assert not storage.partial_path(partial.pk).exists()
    assert progress.read(partial) is None
    # Anything not unfinished is skipped, untouched.
    assert snapshot(complete) == complete_before
    assert final_path(complete).read_bytes() == b"d" * 500
    assert messages_of(response) == [
        "Aborted 1 upload and deleted its partial file.",
        "Skipped 1 upload that was not unfinished.",
    ]


def test_delete_action_confirms_then_removes_rows_files_and_totals(
    admin_client, user, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        partial = make_upload(user, "partial.bin", b"p" * 1000, received=600)
        complete = make_upload(user, "complete.bin", b"c" * 700)
    keep = make_upload(user, "keep.bin", b"k" * 10)
    selected = {"action": "delete_selected", "_selected_action": [partial.pk, complete.pk]}
    complete_file = final_path(complete)

    actions = dict(admin_client.get(CHANGELIST).context["action_form"].fields["action"].choices)
    confirmation = admin_client.post(CHANGELIST, selected)

    assert actions["delete_selected"] == "Delete selected uploads and their files"
    assert confirmation.status_code == 200
    assert "Are you sure" in confirmation.content.decode()
    assert UploadSession.objects.count() == 3  # nothing happens before the confirmation
    assert storage.partial_size(partial.pk) == 600 and complete_file.exists()

    response = admin_client.post(CHANGELIST, {**selected, "post": "yes"}, follow=True)

    assert response.status_code == 200
    assert list(UploadSession.objects.values_list("pk", flat=True)) == [keep.pk]
    assert not storage.partial_path(partial.pk).exists()
    assert not complete_file.exists()
    assert progress.read(partial) is None and progress.read(complete) is None
    assert final_path(keep).read_bytes() == b"k" * 10
    assert messages_of(response) == ["Deleted 2 uploads and their files."]
    assert set(LogEntry.objects.filter(action_flag=DELETION).values_list("object_id", flat=True)) == {
        str(partial.pk),
        str(complete.pk),
    }


def test_single_delete_removes_the_file_too(admin_client, user):
    partial = make_upload(user, "partial.bin", b"p" * 100, received=30)
    complete = make_upload(user, "complete.bin", b"c" * 100)
    complete_file = final_path(complete)

    first = admin_client.post(delete_url(partial), {"post": "yes"})
    second = admin_client.post(delete_url(complete), {"post": "yes"})

    assert first.status_code == second.status_code == 302
    assert not UploadSession.objects.exists()
    assert not storage.partial_path(partial.pk).exists()
    assert not complete_file.exists()


def test_a_locked_upload_is_reported_as_busy_not_a_crash(admin_client, user, settings):
    settings.UPLOADS_LOCK_TIMEOUT = 0.1
    upload = make_upload(user, "busy.bin", b"b" * 1000, received=100)
    before = snapshot(upload)
    selected = {"_selected_action": [upload.pk]}

    with lock_held_elsewhere(upload):
        abort = admin_client.post(CHANGELIST, {"action": "abort_selected", **selected}, follow=True)
        bulk_delete = admin_client.post(
            CHANGELIST, {"action": "delete_selected", "post": "yes", **selected}, follow=True
        )
        single_delete = admin_client.post(delete_url(upload), {"post": "yes"}, follow=True)

    assert abort.status_code == bulk_delete.status_code == single_delete.status_code == 200
    busy = "1 upload: a request is writing to it; try again shortly."
    assert messages_of(abort) == [f"Could not abort {busy}"]
    assert messages_of(bulk_delete) == [f"Could not delete {busy}"]
    assert messages_of(single_delete) == [f"Could not delete {busy}"]
    assert single_delete.redirect_chain == [(change_url(upload), 302)]
    assert snapshot(upload) == before
    assert storage.partial_size(upload.pk) == 100
    assert not LogEntry.objects.exists()  # no deletion recorded that did not happen


# --- Download ---------------------------------------------------------------------------------------


def test_staff_download_a_completed_file_with_safe_headers(admin_client, user):
    data = b"<html><script>alert(1)</script></html>"
    complete = make_upload(user, "page.html", data)
    partial = make_upload(user, "half.html", data, received=5)

    detail = admin_client.get(change_url(complete)).content.decode()
    response = admin_client.get(download_url(complete))

    assert f'href="{download_url(complete)}"' in detail
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == data
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="page.html"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert download_url(partial) not in admin_client.get(change_url(partial)).content.decode()
    assert admin_client.get(download_url(partial)).status_code == 404


def test_staff_download_of_a_missing_file_is_404_not_500(admin_client, user, media_root):
    complete = make_upload(user, "gone.bin", b"data")
    (media_root / complete.file).unlink()
    assert admin_client.get(download_url(complete)).status_code == 404


def test_an_idle_partial_past_its_expiry_reads_expired(admin_client, user):
    from datetime import timedelta

    from django.utils import timezone

    stale = make_upload(user, "stale.bin", b"x" * 100, received=10)
    UploadSession.objects.filter(pk=stale.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    row = row_of(admin_client.get(CHANGELIST), stale)
    assert "Expired" in row and "Partial" not in row


def test_tus_uploads_are_listed_with_their_protocol_and_a_deferred_size(admin_client, user):
    """A tus upload whose client has not declared its size yet has no percentage to show."""
    deferred = services.upload_create_tus(owner=user, filename="stream.bin", size=None)
    services.upload_append(upload=deferred, offset=0, stream=io.BytesIO(b"x" * 1000), length=1000)
    known = services.upload_create_tus(owner=user, filename="known.bin", size=4000)

    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    deferred_row, known_row = row_of(response, deferred), row_of(response, known)
    assert "tus 1.0.0" in deferred_row and "tus 1.0.0" in known_row
    assert "size unknown" in deferred_row and "size not yet declared" in deferred_row
    assert "0.0%" in known_row
    assert admin_client.get(f"{CHANGELIST}?protocol__exact=tus").status_code == 200
    detail = admin_client.get(change_url(deferred))
    assert detail.status_code == 200 and "size not yet declared" in detail.content.decode()
