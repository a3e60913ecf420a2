"""Test-only crash points (RELIABILITY.md §4): named places where the worker SIGKILLs itself.

Off unless `UPLOADS_TEST_HOOKS` is set when the process starts: `crash_point` is then bound to a
function that does nothing, so production pays one call per point and no setting lookups. With
the hooks on, `UPLOADS_CRASH_POINT="<name>"` or `"<name>@<n>"` kills the process the first (or the
n-th) time it reaches that point, the way a power cut or the OOM killer would: no cleanup, no
response, locks released by the kernel and the database.

Points, in the order a chunk passes them: `before_write`, `mid_body` (after each block written),
`after_write`, `after_fsync`, `after_commit`, `after_redis`, `before_response`; while finishing an
upload: `finalize_before_rename`, `finalize_after_rename`, `finalize_after_commit`.
"""
from __future__ import annotations

import os
import signal
import threading

from django.conf import settings

from .conf import conf

POINTS = (
    "before_write", "mid_body", "after_write", "after_fsync", "after_commit", "after_redis",
    "before_response", "finalize_before_rename", "finalize_after_rename", "finalize_after_commit",
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
