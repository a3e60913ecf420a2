"""Two PostgreSQL functions that let the hot path take (or look at) an upload's lock and read its
row in one round trip, in that order (uploads/locks.py; bench/README.md, issue 6).

One statement cannot do both: it reads rows as of the snapshot taken when it starts, so a writer
that commits and unlocks while it runs would be seen unlocked with its old row. Inside a VOLATILE
function each statement takes a snapshot of its own (READ COMMITTED): the read that follows the
lock sees every commit made before the lock was granted, or found free.

Both return `(flag boolean, upload <the upload table's row type>)`; the row type follows the table,
so later migrations that add columns need not touch them. Other databases lock with flock and read
with a plain query: nothing to create there.
"""
from django.db import migrations

LOCK_AND_READ = """
CREATE OR REPLACE FUNCTION uploads_lock_and_read(lock_key bigint, upload_id uuid)
RETURNS TABLE (flag boolean, upload {table})
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Not granted: one row, flag false (the caller waits, or asks the holder to let go).
    -- Granted: flag true and the row as committed now; no row at all if it was deleted.
    IF NOT pg_try_advisory_lock(lock_key) THEN
        RETURN QUERY SELECT false, NULL::{table};
        RETURN;
    END IF;
    RETURN QUERY SELECT true, u FROM {table} u WHERE u.id = upload_id;
END
$$
"""

LOOK_AND_READ = """
CREATE OR REPLACE FUNCTION uploads_look_and_read(lock_key bigint, upload_id uuid)
RETURNS TABLE (flag boolean, upload {table})
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held boolean;
BEGIN
    -- Whether any session holds the lock now (a bigint key shows as its high and low 32 bits),
    -- then the row as committed after that look; no row if there is none.
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND objsubid = 1
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND classid = ((lock_key >> 32) & 4294967295)::oid
          AND objid = (lock_key & 4294967295)::oid
    ) INTO held;
    RETURN QUERY SELECT held, u FROM {table} u WHERE u.id = upload_id;
END
$$
"""

DROP = ("DROP FUNCTION IF EXISTS uploads_lock_and_read(bigint, uuid)", "DROP FUNCTION IF EXISTS uploads_look_and_read(bigint, uuid)")


def _table(apps) -> str:
    return apps.get_model("uploads", "UploadSession")._meta.db_table


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        table = schema_editor.quote_name(_table(apps))
        for function in (LOCK_AND_READ, LOOK_AND_READ):
            schema_editor.execute(function.format(table=table), params=None)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for statement in DROP:
            schema_editor.execute(statement, params=None)


class Migration(migrations.Migration):

    dependencies = [
        ("uploads", "0003_form_protocol"),
    ]

    operations = [
        migrations.RunPython(create, drop, elidable=False),
    ]
