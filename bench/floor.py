"""The floor under the project's chunk: the per-chunk work its design fixes, without Django.

    # served by bench/compare.py as `floor` (fsync on) and `floor-nofsync`; by hand:
    FLOOR_DSN=postgresql://postgres@127.0.0.1/bench FLOOR_REDIS=redis://127.0.0.1:6379/13 \
        FLOOR_DIR=/tmp/floor FLOOR_FSYNC=0 .venv/bin/python -m gunicorn -c project/gunicorn.py bench.floor:app

A bare WSGI application, served by the project's gunicorn config and worker, that speaks just
enough tus for compare.py (POST, HEAD, PATCH, DELETE) and does per chunk what the README's design
asks of every chunk, the way the project does it:

1. authenticate the token, take the upload's advisory lock and read its row: one PostgreSQL round
   trip (a function, as migrations 0004 and 0006);
2. stream the body in 64 KiB blocks into the partial file at the stored offset, keeping the
   running SHA-256 (the project records every upload's digest); fsync with FLOOR_FSYNC=1;
3. commit the new offset with a conditional UPDATE, then release the lock: one round trip (a
   procedure, as migration 0005; `synchronous_commit` off for it without fsync);
4. SET the running total in Redis, then answer (as the project does).

No Django, DRF or ORM: psycopg and redis-py, a connection of each per thread. What is left
between this and the project is Django, DRF and the project's own checks; what is left between
this and @tus/server is the design (a database and a cache per chunk) and Python. Not a server
for anything else: no limits, and no error handling beyond what the benchmark needs.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid

import psycopg
import redis

BLOCK = 64 * 1024
SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_token (key text PRIMARY KEY, user_id integer NOT NULL);
CREATE TABLE IF NOT EXISTS floor_upload (
    id uuid PRIMARY KEY, owner_id integer NOT NULL, size bigint NOT NULL, "offset" bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE OR REPLACE FUNCTION floor_lock_and_read(lock_key bigint, upload_id uuid, token text)
RETURNS TABLE (flag boolean, owned boolean, "offset" bigint, size bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT pg_try_advisory_lock(lock_key) THEN
        RETURN QUERY SELECT false, false, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, t.user_id = u.owner_id, u."offset", u.size
    FROM floor_upload u JOIN floor_token t ON t.key = token WHERE u.id = upload_id;
END
$$;
CREATE OR REPLACE PROCEDURE floor_commit(
    upload_id uuid, old_offset bigint, new_offset bigint, durable boolean, unlock_key bigint,
    INOUT updated integer
)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    UPDATE floor_upload SET "offset" = new_offset, updated_at = now()
    WHERE id = upload_id AND "offset" = old_offset;
    GET DIAGNOSTICS updated = ROW_COUNT;
    COMMIT;
    PERFORM pg_advisory_unlock(unlock_key);
END
$$;
"""
TOKEN = "floor-token"
HEADERS = [("Tus-Resumable", "1.0.0")]


def setup(dsn: str) -> None:
    """The floor's tables, function, procedure and token, in the (bench) database `dsn`."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(SCHEMA)
        connection.execute("INSERT INTO floor_token VALUES (%s, 1) ON CONFLICT DO NOTHING", [TOKEN])


class Floor:
    def __init__(self) -> None:
        self.dsn = os.environ["FLOOR_DSN"]
        self.directory = os.environ["FLOOR_DIR"]
        self.fsync = os.environ.get("FLOOR_FSYNC", "1") == "1"
        self.redis = redis.Redis.from_url(os.environ["FLOOR_REDIS"], socket_timeout=0.5)
        self.local = threading.local()

    def db(self) -> psycopg.Connection:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = psycopg.connect(self.dsn, autocommit=True)
        return connection

    def __call__(self, environ: dict, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        if path == "/files/" and method == "POST":
            return self.create(environ, start_response)
        upload_id = uuid.UUID(path.rstrip("/").rsplit("/", 1)[-1])
        if method == "DELETE":
            self.db().execute("DELETE FROM floor_upload WHERE id = %s", [upload_id])
            start_response("204 No Content", HEADERS)
            return []
        token = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Token ")
        if method == "HEAD":  # a look, no lock (the project's look also checks for a holder)
            found = self.db().execute(
                'SELECT t.user_id = u.owner_id, u."offset", u.size FROM floor_upload u'
                " JOIN floor_token t ON t.key = %s WHERE u.id = %s", [token, upload_id]).fetchone()
            if found is None or not found[0]:
                start_response("404 Not Found", HEADERS)
                return []
            start_response("200 OK", [*HEADERS, ("Upload-Offset", str(found[1])), ("Upload-Length", str(found[2]))])
            return []
        key = upload_id.int >> 65  # a bigint made from the id, like the project's lock keys
        row = self.db().execute("SELECT * FROM floor_lock_and_read(%s, %s, %s)", [key, upload_id, token]).fetchone()
        if row is None or not row[0]:  # no such upload (the lock was taken), or the lock is busy
            if row is None:
                self.db().execute("SELECT pg_advisory_unlock(%s)", [key])
            start_response("404 Not Found" if row is None else "423 Locked", HEADERS)
            return []
        flag, owned, offset, _size = row
        if not owned:
            self.db().execute("SELECT pg_advisory_unlock(%s)", [key])
            start_response("404 Not Found", HEADERS)
            return []
        return self.patch(environ, start_response, upload_id, key, offset)

    def create(self, environ: dict, start_response):
        upload_id = uuid.uuid4()
        size = int(environ["HTTP_UPLOAD_LENGTH"])
        self.db().execute("INSERT INTO floor_upload VALUES (%s, 1, %s, 0, now())", [upload_id, size])
        open(os.path.join(self.directory, upload_id.hex), "wb").close()
        start_response("201 Created", [*HEADERS, ("Location", f"/files/{upload_id}")])
        return []

    def patch(self, environ: dict, start_response, upload_id: uuid.UUID, key: int, offset: int):
        if int(environ["HTTP_UPLOAD_OFFSET"]) != offset:
            self.db().execute("SELECT pg_advisory_unlock(%s)", [key])
            start_response("409 Conflict", [*HEADERS, ("Upload-Offset", str(offset))])
            return []
        length, stream = int(environ["CONTENT_LENGTH"]), environ["wsgi.input"]
        digest = hashlib.sha256()  # the project resumes its running digest; a fresh one costs the same
        fd = os.open(os.path.join(self.directory, upload_id.hex), os.O_WRONLY)
        try:
            position = offset
            while position < offset + length:
                block = stream.read(min(BLOCK, offset + length - position))
                if not block:
                    break
                os.pwrite(fd, block, position)
                digest.update(block)
                position += len(block)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.db().execute("CALL floor_commit(%s, %s, %s, %s, %s, NULL)", [upload_id, offset, position, self.fsync, key])
        self.redis.set(f"floor:progress:{upload_id.hex}", position, ex=600)  # the key expires by itself
        start_response("204 No Content", [*HEADERS, ("Upload-Offset", str(position))])
        return []


app = Floor() if "FLOOR_DSN" in os.environ else None
