"""A PostgreSQL procedure that commits an upload's new offset and then, in the same round trip,
releases the upload's lock (uploads/locks.py; bench/README.md, issue 6).

The offset of a chunk's last commit must be committed before the lock is released: a writer that
got the lock in between would read the old offset and write over acknowledged bytes. Two
statements in one transaction (or one pipeline) would release first, since a session-level
advisory lock is released at once, not at commit. A procedure may COMMIT between its statements
when it is CALLed outside a transaction block, which is how the engine calls it (autocommit);
inside one, the engine uses a plain UPDATE and releases the lock with a statement of its own.

`durable` false (UPLOADS_FSYNC=0) lets that one transaction skip waiting for PostgreSQL's WAL
flush (`synchronous_commit` off, for it alone): a crash of PostgreSQL or of the machine may then
forget the last offsets committed, and the clients are asked for those bytes again.

The columns are named from the model as of this migration; a later migration that renames one
must create the procedure again.
"""
from django.db import migrations

COMMIT_OFFSET = """
CREATE OR REPLACE PROCEDURE uploads_commit_offset(
    upload_id uuid, old_offset bigint, new_offset bigint, changed_at timestamptz, expires timestamptz,
    durable boolean, unlock_key bigint, INOUT updated integer
)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    -- The conditional UPDATE of services._commit_offset: only if nobody moved the offset.
    UPDATE {table} SET {offset} = new_offset, {updated_at} = changed_at, {expires_at} = expires
    WHERE {id} = upload_id AND {offset} = old_offset AND {status} = 'partial';
    GET DIAGNOSTICS updated = ROW_COUNT;
    COMMIT;
    -- Only now, with the offset committed: the next holder reads it.
    IF unlock_key IS NOT NULL THEN
        PERFORM pg_advisory_unlock(unlock_key);
    END IF;
END
$$
"""

DROP = "DROP PROCEDURE IF EXISTS uploads_commit_offset(uuid, bigint, bigint, timestamptz, timestamptz, boolean, bigint, integer)"


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    meta = apps.get_model("uploads", "UploadSession")._meta
    names = {
        name: schema_editor.quote_name(meta.get_field(name).column)
        for name in ("id", "offset", "updated_at", "expires_at", "status")
    }
    schema_editor.execute(COMMIT_OFFSET.format(table=schema_editor.quote_name(meta.db_table), **names), params=None)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):

    dependencies = [
        ("uploads", "0004_lock_and_read_functions"),
    ]

    operations = [
        migrations.RunPython(create, drop, elidable=False),
    ]
