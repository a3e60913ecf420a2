"""Settings for the resumable-uploads project.

Every deployment-specific value comes from an environment variable with an embedded default, so a
fresh checkout runs with no configuration (SQLite, local Redis) and production overrides what it needs.
The `UPLOADS_*` variables are documented in README.md; their defaults live in `uploads/conf.py`.
"""
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in (os.environ.get(name) or default).split(",") if item.strip()]


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server as `url`, another logical database number."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def redis_db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


DEBUG = env_bool("DEBUG", False)
# The default key is only good for a laptop; uploads.W001 warns when DEBUG is off and it is unchanged.
INSECURE_DEFAULT_SECRET_KEY = "django-insecure-resumable-uploads-local-development-only"
SECRET_KEY = os.environ.get("SECRET_KEY") or INSECURE_DEFAULT_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "uploads",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Before anything that can answer on its own, so every response (errors too) gets CORS headers.
    "corsheaders.middleware.CorsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Before CSRF, authentication and routing: they must see the overriding method.
    "uploads.middleware.MethodOverrideMiddleware",
    "uploads.middleware.TestHooksMiddleware",  # removes itself unless UPLOADS_TEST_HOOKS
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# CORS for browser clients on other origins (tus-js-client, Uppy): only the listed origins, with
# credentials (cookies) allowed, so the origin is echoed, never `*` (TUS.md M1-M4). Session-auth
# requests from those origins also need them as CSRF trusted origins.
CORS_ALLOWED_ORIGINS = env_list("UPLOADS_CORS_ORIGINS", "")
CSRF_TRUSTED_ORIGINS = [*CSRF_TRUSTED_ORIGINS, *(o for o in CORS_ALLOWED_ORIGINS if o not in CSRF_TRUSTED_ORIGINS)]
CORS_URLS_REGEX = r"^/(files|api)(/.*)?$"
CORS_ALLOW_CREDENTIALS = True
CORS_ALLOW_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
CORS_ALLOW_HEADERS = (
    "accept", "authorization", "content-type", "origin", "user-agent", "x-csrftoken", "x-requested-with",
    "x-request-id", "x-http-method-override",
    "tus-resumable", "upload-length", "upload-offset", "upload-metadata", "upload-defer-length",
    "upload-concat", "upload-checksum",
    "content-range", "content-digest",  # the REST API's chunk headers
)
CORS_EXPOSE_HEADERS = (
    "Location", "Upload-Offset", "Upload-Length", "Upload-Defer-Length", "Upload-Metadata", "Upload-Concat",
    "Upload-Expires", "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm",
    "Retry-After",
)
CORS_PREFLIGHT_MAX_AGE = 86400

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: DATABASE_URL, SQLite file in the project folder by default -----------------------
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("CONN_MAX_AGE") or "60"),
        # A worker whose connection died with a PostgreSQL restart reconnects instead of failing
        # its first request (RELIABILITY.md C2).
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # The same backend, with a health check that needs no round trip (see its docstring).
    DATABASES["default"]["ENGINE"] = "project.postgresql"
    if env_bool("DATABASE_PREPARED_STATEMENTS", True):
        # Parameters bound by the server, and each query prepared once it has run 5 times on a
        # connection, so PostgreSQL stops parsing and planning the hot queries on every request:
        # its CPU per request halved and the offset look-up's p50 fell ~15 % (bench/README.md).
        # Behind PgBouncer in transaction mode this needs PgBouncer >= 1.21 with
        # max_prepared_statements set, or DATABASE_PREPARED_STATEMENTS=0.
        DATABASES["default"].setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # IMMEDIATE takes the write lock at BEGIN, so concurrent writers wait (up to `timeout`)
            # instead of failing with "database is locked" half-way (RELIABILITY.md C3).
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests that start a real server in another process need a database file, not :memory:;
    # one per test process, so two runs on one machine never delete each other's.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"resumable-uploads-test-{os.getpid()}.sqlite3")
    }
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: the default cache, and the upload progress totals in their own database -----------
# `cache.clear()` on django-redis runs FLUSHDB (RELIABILITY.md X9), so the running totals live in a
# separate logical database that clearing the default cache cannot touch.
# An empty variable counts as unset, as for every variable here.
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
UPLOADS_REDIS_URL = os.environ.get("UPLOADS_REDIS_URL") or redis_url_with_db(
    REDIS_URL, (redis_db_of(REDIS_URL) + 1) % 16
)
# Several deployments (or test runs) sharing one Redis keep apart by a prefix on every key.
CACHE_KEY_PREFIX = os.environ.get("CACHE_KEY_PREFIX") or ""
_REDIS_OPTIONS = {
    "CLIENT_CLASS": "django_redis.client.DefaultClient",
    # Redis is a cache here: a dead or slow server must cost milliseconds, not a worker.
    "SOCKET_CONNECT_TIMEOUT": 0.5,
    "SOCKET_TIMEOUT": 0.5,
}
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": f"{CACHE_KEY_PREFIX}app",
        "OPTIONS": {**_REDIS_OPTIONS, "IGNORE_EXCEPTIONS": True},
    },
    "uploads": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": UPLOADS_REDIS_URL,
        "KEY_PREFIX": f"{CACHE_KEY_PREFIX}uploads",
        "OPTIONS": dict(_REDIS_OPTIONS),
    },
}

# --- Files ---------------------------------------------------------------------------------------
# Nothing under MEDIA_ROOT is served directly: partial files never are, and completed files go
# through the download view, which sets attachment / nosniff / sandbox headers.
MEDIA_ROOT = os.environ.get("MEDIA_ROOT") or str(BASE_DIR / "media")
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT") or str(BASE_DIR / "staticfiles")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # serve app static files without collectstatic in development
# Multipart files (the page's form without JavaScript, the admin) go to a temporary file on disk,
# however small; none may pass UPLOADS_MAX_SIZE; a full temporary disk is a clean 507.
FILE_UPLOAD_HANDLERS = ["uploads.http.DiskUploadHandler"]
FILE_UPLOAD_PERMISSIONS = 0o640
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o750

# --- Auth ----------------------------------------------------------------------------------------
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Behind a TLS-terminating proxy (README, "Deployment").
if env_bool("USE_X_FORWARDED", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    USE_X_FORWARDED_HOST = True

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- REST framework ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first, so an anonymous request gets 401 with `WWW-Authenticate: Token`.
        "uploads.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "uploads.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Resumable uploads API",
    "DESCRIPTION": "Create an upload, send its bytes in chunks with Content-Range, resume after any "
    "interruption from the offset the server reports.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Upload engine (defaults in uploads/conf.py; README lists them) -------------------------------
_UPLOADS_INT = [
    "MAX_SIZE", "CHUNK_SIZE", "EXPIRY", "BLOCK_SIZE", "COMMIT_BYTES", "MAX_ACTIVE_PER_USER",
    "MAX_RESERVED_PER_USER", "MIN_FREE_SPACE",
]
_UPLOADS_FLOAT = ["COMMIT_INTERVAL", "LOCK_TIMEOUT", "BODY_TIMEOUT"]
_UPLOADS_BOOL = ["FSYNC", "TEST_HOOKS"]
for _name in _UPLOADS_INT + _UPLOADS_FLOAT + _UPLOADS_BOOL:
    _raw = os.environ.get(f"UPLOADS_{_name}")
    if _raw is None or _raw == "":
        continue
    if _name in _UPLOADS_INT:
        globals()[f"UPLOADS_{_name}"] = int(_raw)
    elif _name in _UPLOADS_FLOAT:
        globals()[f"UPLOADS_{_name}"] = float(_raw)
    else:
        globals()[f"UPLOADS_{_name}"] = env_bool(f"UPLOADS_{_name}", True)
# Test-only (uploads/faults.py): with UPLOADS_TEST_HOOKS, kill the worker at this crash point.
UPLOADS_CRASH_POINT = os.environ.get("UPLOADS_CRASH_POINT") or ""
# Test-only: with UPLOADS_TEST_HOOKS, append every partial-file writer's interval to this file (INV7).
UPLOADS_WRITE_LOG = os.environ.get("UPLOADS_WRITE_LOG") or ""

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"uploads": {"level": os.environ.get("UPLOADS_LOG_LEVEL") or "INFO"}},
}
