"""A PostgreSQL function that takes an upload's lock for its owner and reads its row, for a chunk
read ahead with the request's token (uploads/api.py `UploadReadAhead`; bench/README.md, issue 6).

A chunk sent with a token used to read the token and the upload in one statement, then take the
lock and read the row again in a second (`uploads_lock_and_read`, migration 0004). This function
lets the first statement do both: called in it with the token's user id, it takes the lock only
when that user owns the upload and it is unfinished, so a request with another's token, or a
wrong one, never holds the lock even for the moment before DRF refuses it. The engine then adopts
the lock (`locks.upload_lock(held=...)`), and the view releases it if the request ends before.

Returns `(flag, upload)` as the functions of 0004 do: flag true with the row as committed once the
lock was granted; flag false (not taken: not the owner's, not unfinished, or busy) with the row as
it reads now, for the caller's usual path to lock and read again. The owner column's type is the
user model's key, as of this migration.
"""
from django.db import migrations

LOCK_AND_READ_OWNED = """
CREATE OR REPLACE FUNCTION uploads_lock_and_read_owned(lock_key bigint, upload_id uuid, owner {owner_type})
RETURNS TABLE (flag boolean, upload {table})
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Nested IFs, not AND: SQL does not promise to evaluate the lock last.
    IF owner IS NOT NULL AND EXISTS (
        SELECT 1 FROM {table} u WHERE u.{id} = upload_id AND u.{owner} = owner AND u.{status} = 'partial'
    ) THEN
        IF pg_try_advisory_lock(lock_key) THEN
            -- A statement of its own, so a snapshot taken after the lock was granted.
            RETURN QUERY SELECT true, u FROM {table} u WHERE u.{id} = upload_id AND u.{status} = 'partial';
            IF FOUND THEN
                RETURN;
            END IF;
            -- Finished or deleted meanwhile: nothing to write, so nothing to hold.
            PERFORM pg_advisory_unlock(lock_key);
        END IF;
    END IF;
    RETURN QUERY SELECT false, u FROM {table} u WHERE u.{id} = upload_id;
END
$$
"""

DROP = "DROP FUNCTION IF EXISTS uploads_lock_and_read_owned(bigint, uuid, {owner_type})"


def _owner_type(apps, connection) -> str:
    return apps.get_model("uploads", "UploadSession")._meta.get_field("owner").target_field.rel_db_type(connection)


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    meta = apps.get_model("uploads", "UploadSession")._meta
    quote = schema_editor.quote_name
    schema_editor.execute(
        LOCK_AND_READ_OWNED.format(
            table=quote(meta.db_table),
            owner_type=_owner_type(apps, schema_editor.connection),
            **{name: quote(meta.get_field(name).column) for name in ("id", "owner", "status")},
        ),
        params=None,
    )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP.format(owner_type=_owner_type(apps, schema_editor.connection)), params=None)


class Migration(migrations.Migration):

    dependencies = [
        ("uploads", "0005_commit_offset_procedure"),
    ]

    operations = [
        migrations.RunPython(create, drop, elidable=False),
    ]
