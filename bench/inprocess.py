"""The project's own cost per request, without a server: its WSGI handler called in a loop.

    .venv/bin/python bench/inprocess.py                         # tus HEAD, REST GET, 64 KiB PATCH; 3 runs
    .venv/bin/python bench/inprocess.py --baseline /tmp/base    # the same, alternating with another tree

Each run is a child process that imports the project (from this tree or `--baseline`) with the
production-like settings of `compare.py` (PostgreSQL in a fresh database `bench_<pid>`, Redis 12/13
with a per-run prefix, fsync on), creates one tus upload through the handler and then times
`--requests` tus HEADs, as many REST GETs of the upload and as many 64 KiB PATCHes, calling
`application(environ, start_response)` directly: Django, its middleware, DRF, the view, the
engine and the database round trips, but no gunicorn, no socket and no client. Figures: wall and
CPU (this process only, so not PostgreSQL's) milliseconds per request, medians over the runs.
Where a server-side figure of `compare.py` moves and this one does not, the change is in the
server or the machine, not in the project's code.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402 - the database and settings compare.py uses

CHUNK = 64 * 1024


def child(root: str, requests: int, profile: str | None = None) -> dict:
    """Runs in the child process: the loop itself."""
    import io

    sys.path.insert(0, root)
    os.chdir(root)
    from project.wsgi import application

    token = os.environ["BENCH_TOKEN"]
    status: list[str] = []

    def call(method: str, path: str, body: bytes = b"", **headers: str) -> str:
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "HTTP_HOST": "127.0.0.1", "HTTP_AUTHORIZATION": f"Token {token}", "HTTP_TUS_RESUMABLE": "1.0.0",
            "CONTENT_LENGTH": str(len(body)),
            **{name if name == "CONTENT_TYPE" else f"HTTP_{name}": value for name, value in headers.items()},
        }
        response = application(environ, lambda line, _headers, _exc=None: status.append(line))
        for _ in response:
            pass
        response.close()
        return status.pop()

    warm = 20
    assert call("POST", "/files/", UPLOAD_LENGTH=str(CHUNK * (requests + warm))).startswith("201")
    from uploads.models import UploadSession

    upload_id = UploadSession.objects.order_by("-created_at").values_list("pk", flat=True).first()
    path = f"/files/{upload_id}"
    offset = 0

    def head() -> None:
        assert call("HEAD", path).startswith("200")

    def get() -> None:
        assert call("GET", f"/api/uploads/{upload_id}", ACCEPT="application/json").startswith("200")

    def patch() -> None:
        nonlocal offset
        line = call("PATCH", path, body, UPLOAD_OFFSET=str(offset), CONTENT_TYPE="application/offset+octet-stream")
        assert line.startswith("204"), line
        offset += CHUNK

    body = os.urandom(CHUNK)
    figures = {}
    for name, step in (("head", head), ("get", get), ("patch", patch)):
        for _ in range(warm // 2):
            step()
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            step()
        figures[f"{name}_wall_ms"] = (time.perf_counter() - wall) / requests * 1e3
        figures[f"{name}_cpu_ms"] = (time.process_time() - cpu) / requests * 1e3
        if profiler:
            profiler.disable()
            profiler.dump_stats(f"{profile}.{name}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="HEADs, and as many GETs and PATCHes, per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout to time alternately (same database schema)")
    parser.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--project-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a variable for the project, as in compare.py (e.g. UPLOADS_FSYNC=0)")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="cProfile each timed loop into PREFIX.<tree>.<run>.head / .get / .patch (slower; for "
                             "finding where the time goes, e.g. with `python -m pstats`)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.profile)))
        return

    import tempfile

    trees = {"project": str(compare.ROOT)}
    if args.baseline:
        trees["baseline"] = str(Path(args.baseline).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as work:
        settings = argparse.Namespace(pg_url=args.pg_url, redis_url=args.redis_url,
                                      project_env=args.project_env, workers=1, threads=1)
        project = compare.Project(settings, Path(work))
        project.setup()
        try:
            results: dict[str, list[dict]] = {name: [] for name in trees}
            for run in range(args.runs):
                for name, root in trees.items():
                    profile = ["--profile", f"{args.profile}.{name}.{run}"] if args.profile else []
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", root, "--requests", str(args.requests), *profile],
                        env=project.env(BENCH_TOKEN=project.token), capture_output=True, text=True,
                        timeout=600, check=True,
                    )
                    results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    compare.log(f"run {run} {name}: {results[name][-1]}")
        finally:
            project.teardown()
    print("| tree | HEAD wall ms | HEAD CPU ms | REST GET wall ms | GET CPU ms | 64 KiB PATCH wall ms | PATCH CPU ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        cells = [statistics.median(run[f"{step}_{figure}_ms"] for run in runs)
                 for step in ("head", "get", "patch") for figure in ("wall", "cpu")]
        print(f"| {name} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
