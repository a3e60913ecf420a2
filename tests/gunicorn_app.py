"""A WSGI app for tests/test_gunicorn_worker.py: answers with the id of the thread serving it."""
import threading


def application(environ, start_response):
    body = str(threading.get_ident()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
