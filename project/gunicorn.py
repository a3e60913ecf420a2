"""gunicorn settings for `make run` and the live tests: `gunicorn -c project/gunicorn.py project.wsgi`.

gthread workers: a sync worker is SIGKILLed when one request outlives `timeout` (RELIABILITY.md X4),
and a long chunk over a slow link is exactly such a request. With gthread the worker's main loop
keeps heart-beating while threads stream bodies, so only a hung worker is killed. Every value can be
overridden with GUNICORN_CMD_ARGS.
"""
import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
# gthread, serving a kept-alive connection's back-to-back requests on one thread (see the module).
worker_class = "project.gunicorn_worker.ThreadWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = "-"
# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), which
# every instance on the machine would share and clobber; this project does not use it.
control_socket_disable = True
