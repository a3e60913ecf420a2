"""project/postgresql: the health check answers from the socket, and still catches a dead connection."""
from __future__ import annotations

import os
import select
import signal
import threading

import psycopg
import pytest
from django.db import connection, connections

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="the PostgreSQL backend"),
]


@pytest.fixture(autouse=True)
def _fresh_connection_afterwards():
    yield
    connection.close()  # a terminated one cannot flush the test database


def _backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _terminate(pid: int) -> None:
    """End `pid` from another connection, as a PostgreSQL restart does, and wait for the socket to see it."""
    settings = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in settings.items() if k != "context"}, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    poller = select.poll()
    poller.register(connection.connection.fileno(), select.POLLIN)
    assert poller.poll(5000), "the terminated backend's socket never turned readable"


def test_a_live_connection_is_usable_without_a_round_trip():
    pid = _backend_pid()
    try:
        os.kill(pid, signal.SIGSTOP)  # a backend that cannot answer: any query would hang
    except PermissionError:
        pytest.skip("cannot stop the PostgreSQL backend (not root, nor its user)")
    answers = []
    wrapper = connections["default"]  # this thread's, asked from another one
    try:
        checker = threading.Thread(target=lambda: answers.append(wrapper.is_usable()), daemon=True)
        checker.start()
        checker.join(5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answers == [True]


def test_a_connection_the_server_ended_is_not_usable():
    _terminate(_backend_pid())
    assert connection.is_usable() is False


def test_the_next_request_reconnects_after_the_server_ended_its_connection():
    """What CONN_HEALTH_CHECKS is for (RELIABILITY C2): the check fails, Django reconnects, the query runs."""
    old = _backend_pid()
    _terminate(old)
    connection.health_check_done = False
    connection.close_if_health_check_failed()
    assert connection.connection is None
    assert _backend_pid() != old
