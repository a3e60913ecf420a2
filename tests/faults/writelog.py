"""Reading the server's write log (uploads/faults.py) for INV7, one writer per upload.

Plain Python, no Django: `bench/chaos.py` reads the log of its own server with it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Writer:
    upload: str
    pid: str
    start: int
    end: int | None  # None: the worker was killed while it held the file


def writers(log: Path) -> list[Writer]:
    closed: dict[tuple[str, str, int], int] = {}
    opened: list[tuple[str, str, int]] = []
    for line in Path(log).read_text().splitlines() if Path(log).exists() else []:
        kind, pid, upload, start, *end = line.split()
        if kind == "open":
            opened.append((upload, pid, int(start)))
        else:
            closed[(upload, pid, int(start))] = int(end[0])
    return [Writer(upload, pid, start, closed.get((upload, pid, start))) for upload, pid, start in opened]


def overlapping_writers(log: Path) -> tuple[int, list[str]]:
    """(writers checked, descriptions of every overlap). A killed writer's end is unknown, so it
    only counts as overlapping when it opened inside another writer's known interval."""
    by_upload: dict[str, list[Writer]] = {}
    for writer in writers(log):
        by_upload.setdefault(writer.upload, []).append(writer)
    overlaps = []
    for upload, group in by_upload.items():
        group.sort(key=lambda writer: writer.start)
        for later_index, later in enumerate(group):
            for earlier in group[:later_index]:
                if earlier.end is not None and earlier.start <= later.start < earlier.end:
                    overlaps.append(
                        f"upload {upload}: pid {later.pid} opened at {later.start} ns while pid {earlier.pid} "
                        f"held it ({earlier.start}-{earlier.end} ns)"
                    )
    return sum(len(group) for group in by_upload.values()), overlaps
