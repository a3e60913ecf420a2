"""The invariants every scenario must leave behind (RELIABILITY.md §3), in one place.

`assert_invariants(upload, source_bytes, acked=...)` checks INV1, INV2, INV3, INV5 and INV6 against
the real database, the real files under MEDIA_ROOT and the real Redis. `OffsetLog` checks INV4 on
the client's side. `assert_single_writer` checks INV7 (one writer) from the server's write log.
INV8 (no 500 on hostile input) is a property of whole scenarios: the fuzzing tests assert it.

`assert_invariants` reads Redis *before* the database, as the invariant sampler does: Redis may
trail the database, never lead it, so reading them in this order can only make a violation
visible, never hide one.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from django.conf import settings

from uploads import progress, storage
from uploads.models import Status, UploadSession

from .faults.writelog import overlapping_writers


def partial_bytes(upload: UploadSession) -> bytes | None:
    path = storage.partial_path(upload.pk)
    return path.read_bytes() if path.exists() else None


def final_files(upload: UploadSession) -> list[Path]:
    """Every file in the upload's final directory (there must be at most one)."""
    directory = Path(settings.MEDIA_ROOT) / Path(storage.final_name(upload.pk, upload.filename)).parent
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def assert_invariants(
    upload: UploadSession, source_bytes: bytes, acked: int = 0, *, reconciled: bool = True
) -> UploadSession:
    """Assert INV1/2/3/5 for `upload`, whose client is sending `source_bytes`.

    `acked` is the highest offset the client was told is stored (ACK_MAX). `reconciled=False`
    allows a tail on disk past the committed offset (right after a simulated crash, before the
    next writer truncates it). Returns the freshly read row.
    """
    redis_offset = progress.read(upload)  # INV3 reads the cache before the truth
    row = UploadSession.objects.get(pk=upload.pk)
    # A tus upload may defer its size; once declared it must match what the client sends.
    assert row.size in (None, len(source_bytes)), "the test sends a different file than the row declares"
    on_disk = partial_bytes(row)
    finals = final_files(row)

    # INV1: no phantom ack. A client is never told more than the DB holds, the DB never more than disk.
    assert acked <= row.offset, f"acked {acked} > committed offset {row.offset}"
    if row.status == Status.PARTIAL:
        assert on_disk is not None, "a partial upload lost its partial file"
        assert row.offset <= len(on_disk), f"offset {row.offset} > file length {len(on_disk)}"
        if reconciled:
            assert len(on_disk) == row.offset, f"file length {len(on_disk)} != offset {row.offset}"
        # INV2: no wrong bytes below the committed offset.
        assert on_disk[: row.offset] == source_bytes[: row.offset], "stored bytes differ from the source"
        assert finals == [], "an unfinished upload has a published file"

    # INV3: the cache trails the truth.
    assert redis_offset is None or redis_offset <= row.offset, (
        f"Redis says {redis_offset}, ahead of the committed offset {row.offset}"
    )

    # INV5: complete means correct, published exactly once, nothing left in the partial area.
    expected_sha = hashlib.sha256(source_bytes).hexdigest()
    if row.status == Status.COMPLETE:
        assert row.offset == row.size
        assert on_disk is None, "a complete upload left its partial file behind"
        assert row.file == storage.final_name(row.pk, row.filename)
        assert finals == [Path(settings.MEDIA_ROOT) / row.file], f"final files: {finals}"
        assert hashlib.sha256(finals[0].read_bytes()).hexdigest() == expected_sha
        assert row.sha256 == expected_sha
        assert row.completed_at is not None
    else:
        assert not row.file and not row.sha256, "an unfinished upload records a final file"
    if row.status in (Status.FAILED, Status.EXPIRED):
        assert on_disk is None, f"a {row.status} upload kept its partial file"
        assert finals == [], f"a {row.status} upload has a published file"
    if row.offset == row.size and row.status == Status.PARTIAL:
        # Only legal between the last commit and finalize (a crash there); the next request finishes.
        assert not reconciled, "all bytes are committed but the upload was never finalized"
    assert_contained(Path(settings.MEDIA_ROOT))
    return row


def assert_single_writer(write_log: Path) -> int:
    """INV7: no two writers ever held one upload's partial file open at once, across processes
    (read from the server's write log). Returns how many writers were checked."""
    checked, overlaps = overlapping_writers(write_log)
    assert not overlaps, "\n".join(overlaps)
    return checked


class OffsetLog:
    """INV4: the offsets one client was shown never decrease. Record each one as it is seen."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def saw(self, offset: int | str) -> int:
        offset = int(offset)
        assert not self.seen or offset >= self.seen[-1], f"offset went back from {self.seen[-1]} to {offset}"
        self.seen.append(offset)
        return offset

    @property
    def acked(self) -> int:
        return max(self.seen, default=0)


# Disk-full tests fill their small file systems with files of this name; the app never makes one.
BALLAST = "ballast"


def assert_contained(media_root: Path) -> None:
    """INV6: every file the app made under MEDIA_ROOT has a name the server chose: a partial file,
    lock or release request in the partial directory, or `uploads/<id>/<id>[.ext]`; nothing else,
    and nothing named from user input."""
    media_root = Path(media_root)
    for path in media_root.rglob("*"):
        if not path.is_file() or path.name.startswith(BALLAST):
            continue
        relative = path.relative_to(media_root).parts
        if relative[0] == storage.partial_dir().name:
            assert len(relative) == 2 and re.fullmatch(r"[0-9a-f]{32}\.(part|lock|release)", relative[1]), path
        else:
            assert relative[0] == "uploads" and len(relative) == 3, path
            assert re.fullmatch(r"[0-9a-f]{32}", relative[1]), path
            assert re.fullmatch(rf"{relative[1]}(\.[a-z0-9]{{1,16}})?", relative[2]), path
