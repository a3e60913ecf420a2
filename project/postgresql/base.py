"""Django's PostgreSQL backend, with a connection health check that costs no round trip.

`CONN_HEALTH_CHECKS` keeps a PostgreSQL restart from failing the first request of every worker
(RELIABILITY.md C2), but Django checks with a `SELECT 1` before each request's first query: one
round trip in four of a tus HEAD (issue 6). An idle connection, though, is sent nothing unprompted
except when the server ends it: it then writes an error and closes, and the socket turns readable.
So a socket with nothing to read is as alive as `SELECT 1` would have found it, and only a
readable one (closed, or holding a message) takes Django's full check.

`ENGINE = "project.postgresql"` is set in settings for every PostgreSQL `DATABASE_URL`.
"""
import select

from django.db.backends.postgresql import base


class DatabaseWrapper(base.DatabaseWrapper):
    def is_usable(self) -> bool:
        try:
            poller = select.poll()
            poller.register(self.connection.fileno(), select.POLLIN)
            if not poller.poll(0):
                return True
        except (OSError, ValueError, base.Database.Error):
            return False  # no socket any more: psycopg already knows it is closed
        return super().is_usable()
