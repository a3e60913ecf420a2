"""Disk faults on real, small file systems (RELIABILITY.md §5 D1-D6, and H1).

Every scenario mounts a real tmpfs (`mount -t tmpfs -o size=...,nr_inodes=...`) and points
MEDIA_ROOT (or the multipart temp directory, or the completed-files directory) at it, so ENOSPC
comes from the kernel, short writes and all (X6), not from a mock. Mounting needs root (CI runs as
root). `unshare -rm` is no substitute here: its mount exists only inside a new namespace, and both
the in-process engine and the test's own checks of the files must see it, so without root these
tests skip and say why. Every mount is unmounted in teardown, lazily if something still holds it.

D4 (fsync fails once, the fsyncgate pattern) needs an injected EIO, which no real tmpfs produces:
it is covered in test_services.py (`test_fsync_failure_refuses_the_chunk`,
`test_fsync_failure_at_an_intermediate_commit`, and the short-body variant), not repeated here.
The injected-ENOSPC unit test there (`test_disk_full_mid_chunk_truncates_to_the_committed_offset`)
is the engine-level twin of D1 below.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from uploads import storage
from uploads.models import Status, UploadSession

from .invariants import OffsetLog, assert_invariants, final_files, partial_bytes

KiB = 1024
MiB = 1024 * KiB
OCTET = "application/octet-stream"
TUS_OCTETS = "application/offset+octet-stream"
TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}


# --- Real small file systems ----------------------------------------------------------------------


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
        # Something (a server being stopped, an open temp file) still holds it: detach it now,
        # the kernel frees it when the last user lets go.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(path_or_name, size, inodes=None)`: a fresh tmpfs; all unmounted after the test."""
    if shutil.which("mount") is None:
        pytest.skip("the disk-full tests need mount(8) to make a small tmpfs")
    if os.geteuid() != 0:
        pytest.skip(
            "the disk-full tests mount a small tmpfs and need root (CAP_SYS_ADMIN); CI runs them as root. "
            "`unshare -rm` would hide the mount from this test process, which must see the files."
        )
    mounted: list[Path] = []

    def mount(where: str | Path, size: str, inodes: int | None = None) -> Path:
        path = Path(where) if os.path.isabs(str(where)) else tmp_path / str(where)
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        _umount(path)


def fill(path: Path, size: int) -> Path:
    """Ballast: `size` bytes really allocated (tmpfs has no holes for written zeros)."""
    block = b"\0" * MiB
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            remaining -= handle.write(block[: min(remaining, len(block))])
    return path


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def use_media_root(settings, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    settings.MEDIA_ROOT = str(path)
    return path


# --- The two resumable front ends, through the Django test client ---------------------------------


class Rest:
    name = "rest"
    appended = 200

    def __init__(self, client: APIClient) -> None:
        self.client = client

    def create(self, size: int, name: str = "data.bin"):
        return self.client.post("/api/uploads/", {"filename": name, "size": size}, format="json")

    @staticmethod
    def id_of(response) -> str:
        return response.json()["id"]

    def send(self, upload_id: str, source: bytes, start: int, end: int):
        return self.client.put(
            f"/api/uploads/{upload_id}/", data=source[start:end], content_type=OCTET,
            HTTP_CONTENT_RANGE=f"bytes {start}-{end - 1}/{len(source)}",
        )

    @staticmethod
    def acked(response) -> int:
        return response.json()["offset"]

    def look(self, upload_id: str):
        """The offset a client is shown (GET, which also finishes an upload left unfinalized)."""
        response = self.client.get(f"/api/uploads/{upload_id}/")
        return response, response.json().get("offset")

    def delete(self, upload_id: str):
        return self.client.delete(f"/api/uploads/{upload_id}/")


class Tus:
    name = "tus"
    appended = 204

    def __init__(self, client: APIClient) -> None:
        self.client = client

    def create(self, size: int, name: str = "data.bin", body: bytes = b""):
        extra = {"content_type": TUS_OCTETS} if body else {}
        return self.client.generic(
            "POST", "/files/", body, CONTENT_LENGTH=str(len(body)), HTTP_UPLOAD_LENGTH=str(size), **TUS, **extra
        )

    @staticmethod
    def id_of(response) -> str:
        return str(uuid.UUID(urlsplit(response["Location"]).path.rstrip("/").rsplit("/", 1)[-1]))

    def send(self, upload_id: str, source: bytes, start: int, end: int):
        body = source[start:end]
        return self.client.generic(
            "PATCH", f"/files/{upload_id}", body, content_type=TUS_OCTETS,
            CONTENT_LENGTH=str(len(body)), HTTP_UPLOAD_OFFSET=str(start), **TUS,
        )

    @staticmethod
    def acked(response) -> int:
        return int(response["Upload-Offset"])

    def look(self, upload_id: str):
        response = self.client.head(f"/files/{upload_id}", **TUS)
        offset = response.get("Upload-Offset")
        return response, None if offset is None else int(offset)

    def delete(self, upload_id: str):
        return self.client.delete(f"/files/{upload_id}", **TUS)


FRONTS = {"rest": Rest, "tus": Tus}


def created(front, size: int, name: str = "data.bin") -> str:
    response = front.create(size, name)
    assert response.status_code == 201, response.content
    return front.id_of(response)


def row(upload_id: str) -> UploadSession:
    return UploadSession.objects.get(pk=upload_id)


def assert_refused_cleanly(response, *statuses: int) -> None:
    """A deliberate, retryable refusal: the expected status, Retry-After, never a 500 or a traceback."""
    assert response.status_code in statuses, (response.status_code, response.content[:500])
    assert response.status_code != 500
    assert b"Traceback" not in response.content
    if response.status_code in (503, 507):
        assert response.get("Retry-After"), "a 503/507 must say when to retry"


def rows_match_partial_files() -> None:
    """No row without its partial file, no partial file without its row (no half-made uploads)."""
    partials = {
        p.name.removesuffix(storage.PARTIAL_SUFFIX)
        for p in (storage.partial_dir().iterdir() if storage.partial_dir().exists() else [])
        if p.name.endswith(storage.PARTIAL_SUFFIX)
    }
    rows = {u.pk.hex for u in UploadSession.objects.filter(status=Status.PARTIAL)}
    assert partials == rows, f"partial files {sorted(partials)} vs unfinished rows {sorted(rows)}"


# --- D1: ENOSPC in the middle of a chunk ----------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("commit_every", [None, 256 * KiB], ids=["no-mid-commit", "streaming-commits"])
@pytest.mark.parametrize("front_name", ["rest", "tus"])
def test_d1_disk_full_mid_chunk_is_507_and_the_upload_resumes(front_name, commit_every, settings, tmpfs, api):
    """8 MiB disk, 6 MiB of ballast, a 4 MiB chunk: 507, nothing acked, FILE_LEN == DB offset
    (the unknown tail of the failed write is cut), other requests unaffected; once the ballast
    goes, the client resumes from the offset it is shown and the file completes with the right SHA."""
    disk = tmpfs("disk", "8m")
    use_media_root(settings, disk / "media")
    settings.UPLOADS_MIN_FREE_SPACE = 0
    settings.UPLOADS_BLOCK_SIZE = 256 * KiB
    # Without mid-chunk commits the offset must not move at all; with them it may keep what was
    # durably committed before the disk filled, and must equal the bytes on disk.
    settings.UPLOADS_COMMIT_BYTES = commit_every or 64 * MiB
    settings.UPLOADS_COMMIT_INTERVAL = 3600
    front = FRONTS[front_name](api)
    shown = OffsetLog()
    source = os.urandom(5 * MiB)
    upload_id = created(front, len(source))

    response = front.send(upload_id, source, 0, MiB)
    assert response.status_code == front.appended, response.content
    shown.saw(front.acked(response))

    ballast = fill(disk / "ballast", 6 * MiB)
    free_before = free_bytes(disk)
    assert free_before <= MiB + 64 * KiB

    response = front.send(upload_id, source, MiB, 5 * MiB)
    assert_refused_cleanly(response, 507)
    current = row(upload_id)
    assert storage.partial_size(current.pk) == current.offset  # FILE_LEN == DB_OFF: the tail was cut
    if commit_every is None:
        assert current.offset == MiB  # the offset did not move
    else:
        assert MiB <= current.offset <= MiB + free_before and current.offset % commit_every == 0
    assert_invariants(current, source, acked=shown.acked)

    # Other requests are unaffected while the disk is full.
    response, offset = front.look(upload_id)
    assert response.status_code == 200 and offset == current.offset
    shown.saw(offset)
    assert Rest(api).client.get("/api/uploads/").status_code == 200

    ballast.unlink()
    response = front.send(upload_id, source, offset, len(source))
    assert response.status_code == front.appended, response.content
    shown.saw(front.acked(response))
    response, offset = front.look(upload_id)
    assert response.status_code == 200 and shown.saw(offset) == len(source)
    done = assert_invariants(current, source, acked=shown.acked)
    assert done.status == Status.COMPLETE


# --- D2 (and H1, free space): creation reserves the disk --------------------------------------------


@pytest.mark.live
def test_d2_parallel_creates_that_would_overcommit_the_disk(tmpfs, start_gunicorn, settings, user, other_user):
    """Four 3 MiB uploads declared at once on an 8 MiB disk (UPLOADS_MIN_FREE_SPACE=0), from two
    users through both protocols: two are accepted, the 3rd and 4th get 507 at creation (before
    any byte is sent), and the two accepted uploads then both complete, in parallel. Never the
    ocis#4516 state where every upload started and all of them stall on a full disk."""
    disk = tmpfs("disk", "8m")
    media = use_media_root(settings, disk / "media")
    server = start_gunicorn(MEDIA_ROOT=str(media), UPLOADS_MIN_FREE_SPACE="0")
    size = 3 * MiB
    tokens = [Token.objects.create(user=u).key for u in (user, other_user)]
    plan = [(tokens[0], "rest"), (tokens[0], "tus"), (tokens[1], "rest"), (tokens[1], "tus")]
    barrier = threading.Barrier(len(plan))
    results: list = [None] * len(plan)

    def create(index: int) -> None:
        token, kind = plan[index]
        auth = {"Authorization": f"Token {token}"}
        barrier.wait(timeout=10)
        if kind == "rest":
            results[index] = requests.post(
                f"{server.url}/api/uploads/", json={"filename": f"f{index}.bin", "size": size}, headers=auth, timeout=20
            )
        else:
            results[index] = requests.post(
                f"{server.url}/files/", headers={**auth, "Tus-Resumable": "1.0.0", "Upload-Length": str(size)}, timeout=20
            )

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(plan))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(r is not None for r in results), "a create never answered"
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201, 201, 507, 507], [(r.status_code, r.text[:200]) for r in results]
    for response in results:
        if response.status_code == 507:
            assert response.headers.get("Retry-After")
    assert UploadSession.objects.count() == 2
    rows_match_partial_files()

    # The two accepted uploads fit, by construction: both finish, at the same time.
    sources, errors = {}, []

    def finish(response, token) -> None:
        try:
            source = os.urandom(size)
            auth = {"Authorization": f"Token {token}"}
            if "Location" in response.headers:  # tus
                url = response.headers["Location"]
                for start in range(0, size, MiB):
                    sent = requests.patch(
                        url, data=source[start : start + MiB], timeout=30,
                        headers={**auth, "Tus-Resumable": "1.0.0", "Content-Type": TUS_OCTETS, "Upload-Offset": str(start)},
                    )
                    assert sent.status_code == 204, sent.text
                upload_id = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
            else:
                url, upload_id = response.json()["url"], response.json()["id"]
                for start in range(0, size, MiB):
                    sent = requests.put(
                        url, data=source[start : start + MiB], timeout=30,
                        headers={**auth, "Content-Type": OCTET,
                                 "Content-Range": f"bytes {start}-{start + MiB - 1}/{size}"},
                    )
                    assert sent.status_code == 200, sent.text
            sources[upload_id] = source
        except Exception as exc:  # noqa: BLE001 - reported below, from the test thread
            errors.append(exc)

    accepted = [(r, plan[i][0]) for i, r in enumerate(results) if r.status_code == 201]
    threads = [threading.Thread(target=finish, args=pair) for pair in accepted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(sources) == 2
    for upload_id, source in sources.items():
        assert assert_invariants(row(upload_id), source, acked=size).status == Status.COMPLETE


@pytest.mark.django_db
@pytest.mark.parametrize("front_name", ["rest", "tus"])
def test_h1_create_larger_than_the_free_disk_is_507_before_any_byte(front_name, settings, tmpfs, api):
    """RELIABILITY H1, the disk half: a declared size the disk cannot hold is refused at creation."""
    disk = tmpfs("disk", "2m")
    use_media_root(settings, disk / "media")
    settings.UPLOADS_MIN_FREE_SPACE = 0
    front = FRONTS[front_name](api)
    response = front.create(4 * MiB)
    assert_refused_cleanly(response, 507)
    assert not UploadSession.objects.exists()
    rows_match_partial_files()
    # The default margin (UPLOADS_MIN_FREE_SPACE, 256 MiB) refuses even one byte on a 2 MiB disk.
    del settings.UPLOADS_MIN_FREE_SPACE
    assert_refused_cleanly(front.create(1), 507)
    assert not UploadSession.objects.exists()


# --- H1: the per-user quota at creation -----------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("front_name", ["rest", "tus"])
def test_h1_quota_exceeded_at_creation_is_413(front_name, settings, api, media_root):
    settings.UPLOADS_MAX_RESERVED_PER_USER = MiB
    front = FRONTS[front_name](api)
    response = front.create(MiB + 1)
    assert response.status_code == 413, response.content
    assert response.json()["code"] == "quota_exceeded"
    if front_name == "tus":
        assert response["Tus-Resumable"] == "1.0.0"
    assert not UploadSession.objects.exists()
    assert not any(p.is_file() for p in media_root.rglob("*")), "a refused create left a file"

    # Up to the quota is fine; the next byte is not, until some of the claim is received.
    upload_id = created(front, MiB)
    assert front.create(1, "more.bin").status_code == 413
    source = os.urandom(MiB)
    assert front.send(upload_id, source, 0, MiB // 2).status_code == front.appended
    created(front, MiB // 2, "more.bin")
    assert UploadSession.objects.count() == 2
    if front_name == "tus":  # creation-with-upload: refused before the body is stored
        response = Tus(api).create(MiB, "body.bin", body=b"x" * 1000)
        assert response.status_code == 413 and UploadSession.objects.count() == 2


# --- D3: ENOSPC while publishing the completed file ------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("front_name", ["rest", "tus"])
def test_d3_disk_full_during_finalize_fails_cleanly_and_retries(front_name, settings, tmpfs, api, media_root):
    """The completed-files directory (MEDIA_ROOT/uploads, where UPLOADS_STORAGE saves) is its own
    small file system, so publishing is a cross-device copy (EXDEV), and the copy hits ENOSPC.
    The last chunk is refused (507), the upload is not complete, nothing half-written is left at
    the final path, the partial data is intact; once space is freed, GET (REST) or HEAD (tus)
    finishes the job, exactly once."""
    settings.UPLOADS_MIN_FREE_SPACE = 0
    final_disk = tmpfs(media_root / "uploads", "2m")
    ballast = fill(final_disk / "ballast", MiB + 512 * KiB)
    front = FRONTS[front_name](api)
    source = os.urandom(MiB)
    upload_id = created(front, len(source))

    response = front.send(upload_id, source, 0, len(source))
    assert_refused_cleanly(response, 507, 503)
    current = row(upload_id)
    assert current.status == Status.PARTIAL and current.offset == current.size
    assert partial_bytes(current) == source, "the received data must survive a failed publish"
    assert final_files(current) == [], f"a half-written file sits at the final path: {final_files(current)}"
    assert_invariants(current, source, reconciled=False)

    # A retry while the disk is still full fails the same clean way.
    response, _ = front.look(upload_id)
    assert_refused_cleanly(response, 507, 503)
    assert row(upload_id).status == Status.PARTIAL
    assert final_files(current) == []

    ballast.unlink()
    response, offset = front.look(upload_id)
    assert response.status_code == 200 and offset == len(source), response.content
    done = assert_invariants(current, source, acked=len(source))
    assert done.status == Status.COMPLETE
    # A resent last chunk changes nothing (409 / tus no-op), and the file is still there once.
    again = front.send(upload_id, source, 0, len(source))
    assert again.status_code in (409, 204), again.content
    assert_invariants(current, source, acked=len(source))


# --- D5: the multipart temp directory is full (the page's form without JavaScript) -----------------


@pytest.mark.django_db
def test_d5_form_upload_with_a_full_temp_dir_is_a_clean_error_page(settings, tmpfs, user, media_root, monkeypatch):
    """Django spools each form file to FILE_UPLOAD_TEMP_DIR; on a 1 MiB disk a 4 MiB file hits
    ENOSPC there, while the multipart body is parsed (the CSRF check is the first to read it),
    before our view runs. The browser must get a deliberate error page (4xx/5xx, not Django's
    500, no traceback), no UploadSession may exist, no temp file may stay behind, and the next
    file that fits must go through."""
    temp = tmpfs("formtmp", "1m")
    settings.FILE_UPLOAD_TEMP_DIR = str(temp)
    # pytest keeps every logged record, and a logged 500's traceback would keep the half-written
    # temp file open for the rest of the test; a real server keeps no such reference.
    monkeypatch.setattr(logging.getLogger("django.request"), "disabled", True)
    client = Client(enforce_csrf_checks=True, raise_request_exception=False)
    client.force_login(user)
    client.get("/")
    token = client.cookies["csrftoken"].value

    response = client.post(
        "/upload/",
        {"csrfmiddlewaretoken": token, "file": SimpleUploadedFile("big.bin", os.urandom(4 * MiB), content_type=OCTET)},
    )
    status, body = response.status_code, response.content
    del response
    gc.collect()
    assert list(temp.iterdir()) == [], "temporary files left behind in FILE_UPLOAD_TEMP_DIR"
    assert not UploadSession.objects.exists()
    assert not any(p.is_file() for p in media_root.rglob("*"))
    assert b"Traceback" not in body
    assert status in (400, 413, 503, 507), (status, body[:300])

    # Nothing is stuck: a file that fits goes through the same form.
    small = os.urandom(100 * KiB)
    response = client.post(
        "/upload/", {"csrfmiddlewaretoken": token, "file": SimpleUploadedFile("small.bin", small, content_type=OCTET)}
    )
    assert response.status_code == 303, response.content[:300]
    assert_invariants(UploadSession.objects.get(filename="small.bin"), small, acked=len(small))


# --- D6: out of inodes ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("front_name", ["rest", "tus"])
def test_d6_out_of_inodes_creation_fails_cleanly(front_name, settings, tmpfs, api):
    """A disk with bytes to spare but no inodes: creates are refused with 507/503 (never a 500),
    no row exists without its partial file (and no partial file without its row); an upload made
    before keeps working or is refused cleanly, and freeing inodes brings everything back."""
    disk = tmpfs("disk", "8m", inodes=8)  # the mount's root, MEDIA_ROOT and the partial dir take 3
    media = use_media_root(settings, disk / "media")
    settings.UPLOADS_MIN_FREE_SPACE = 0
    api.raise_request_exception = False  # a crash must show as the 500 it would be, with its status
    front = FRONTS[front_name](api)
    made: list[str] = []
    refused = None
    for index in range(10):
        response = front.create(10 * KiB, f"f{index}.bin")
        assert response.status_code != 500, response.content[:500]
        if response.status_code != 201:
            refused = response
            break
        made.append(front.id_of(response))
    assert refused is not None, "the inodes never ran out"
    assert_refused_cleanly(refused, 507, 503)
    assert made, "not even one upload fitted"
    assert UploadSession.objects.count() == len(made)
    rows_match_partial_files()
    # Out of inodes for one more upload: its partial file, plus (where locks are files) its lock
    # file, which is made up front so later requests on existing uploads need no new inode.
    assert os.statvfs(media).f_ffree < 2

    # An upload made before the inodes ran out: a chunk (that does not complete it) is stored, or
    # refused cleanly; never a 500 (on SQLite its first write needs a lock-file inode).
    source = os.urandom(10 * KiB)
    response = front.send(made[0], source, 0, 4 * KiB)
    assert response.status_code in (front.appended, 503, 507), (response.status_code, response.content[:500])
    assert_invariants(row(made[0]), source, acked=front.acked(response) if response.status_code < 300 else 0)

    # The owner can always free inodes by deleting an upload, and then creates work again.
    response = front.delete(made[-1])
    assert response.status_code == 204, (response.status_code, response.content[:500])
    assert created(front, 10 * KiB, "after.bin")
    rows_match_partial_files()


@pytest.mark.django_db
def test_d6_no_inode_even_for_the_partial_directory(settings, tmpfs, api):
    """The very first create on a disk whose inodes are all used (by something else): the partial
    directory itself cannot be made. A clean 507/503, no row, not a 500."""
    disk = tmpfs("disk", "8m", inodes=4)
    use_media_root(settings, disk / "media")
    settings.UPLOADS_MIN_FREE_SPACE = 0
    for index in range(8):
        try:
            (disk / f"other{index}").touch()
        except OSError:
            break
    assert os.statvfs(disk).f_ffree == 0
    api.raise_request_exception = False
    for front in (Rest(api), Tus(api)):
        response = front.create(10 * KiB)
        assert_refused_cleanly(response, 507, 503)
    assert not UploadSession.objects.exists()
    assert not storage.partial_dir().exists() or not any(storage.partial_dir().iterdir())
