"""Django settings for the appliance: everything from the environment, with local defaults.

DJANGO_SECRET_KEY          signing key (default: generated once, kept in var/secret_key)
DJANGO_DEBUG               Django's debug pages (default off)
DJANGO_ALLOWED_HOSTS       comma-separated (default 127.0.0.1,localhost)
APPLIANCE_VAR_DIR          SQLite database, secret key, images (default ./var)
DATABASE_URL               postgresql://user:pw@host:port/name (default SQLite in var/)
STORAGE_ROOT               where image files live (default var/images)
REDIS_URL                  live metrics and the Celery broker (default redis://127.0.0.1:6379/0)
APPLIANCE_PROVISION_QUOTA  sum of the virtual sizes of all images (default 64T)
APPLIANCE_IMAGE_MAX_SIZE   largest single image (default 16T; APPLIANCE_IMAGE_MIN_SIZE 1M)
APPLIANCE_STORAGE_RESERVE  free space never given to images (default 1G)
APPLIANCE_NODE_NAME        this host's node name: its engine worker registers it, and its
                           images and exports are placed on it (default: the host name)
APPLIANCE_ROLE             all | central | node: web and storage on this host (default all),
                           web, API and beat only (central: no storage here), or a storage
                           host running only the engine worker (node)
APPLIANCE_NODE_LABELS      this node's labels, comma separated (e.g. ssd,rack=a2): new images
                           asking for labels are placed on nodes having all of them
APPLIANCE_NODE_DOWN_AFTER  seconds without a heartbeat after which a node is shown down and
                           its exports unavailable (default 15; the workers beat every 5)
NBD_BIND, NBD_PORT         where this node's engine listens (default 127.0.0.1, 10809)
NBD_PUBLIC_HOST            host name clients use in nbd:// URIs (default NBD_BIND)
NBD_TLS_MODE               off | optional | required: STARTTLS refused, offered, or demanded
                           before anything else (default optional)
NBD_HANDSHAKE_TIMEOUT      seconds a client has to finish negotiating (default 10)
NBD_MAX_CONNECTIONS        connections the engine accepts at once (default 1024)
NBD_MAX_OPTION_LENGTH      largest option payload a client may send (default 64K; 8K-16M)
NBD_SPIN_US                microseconds an idle connection polls for its next request
                           before sleeping, while at most 2 are open (default 50; 0: never)
APPLIANCE_TLS_DIR          where the engine's certificates, key, CRL and PSK file are written
                           (default var/tls)
APPLIANCE_TLS_SERVER_NAMES extra names and addresses of the server certificate, comma
                           separated (localhost, the node name, 127.0.0.1, ::1, NBD_PUBLIC_HOST
                           and NBD_BIND unless a wildcard address are always in it)
APPLIANCE_HISTORY_RETENTION  how long per-export samples are kept (default 7d, in seconds)
APPLIANCE_METRICS_TOKEN    bearer token Prometheus may use for /metrics (default: none)
APPLIANCE_REMOTE_TIMEOUT   seconds to wait for another node to run a storage operation
                           (create, grow, clone, delete) before answering 503 (default 120)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import (
    database_from_url,
    env_bool,
    env_choice,
    env_labels,
    env_number,
    env_server_names,
    env_size,
    secret_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("APPLIANCE_VAR_DIR") or BASE_DIR / "var")

SECRET_KEY = secret_key(VAR_DIR)
DEBUG = env_bool("DJANGO_DEBUG")
ALLOWED_HOSTS = [
    h.strip()
    for h in (os.environ.get("DJANGO_ALLOWED_HOSTS") or "127.0.0.1,localhost").split(",")
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "appliance.nodes",
    "appliance.storage",
    "appliance.exports",
    "appliance.sessions.apps.ClientSessionsConfig",
    "appliance.pki",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "appliance.urls"
WSGI_APPLICATION = "appliance.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DATABASES = {
    "default": database_from_url(
        os.environ.get("DATABASE_URL"), default_sqlite=VAR_DIR / "appliance.sqlite3"
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Static files (admin, browsable API, Swagger UI from drf-spectacular-sidecar) are served by
# WhiteNoise straight from the installed apps: no CDN, no collectstatic needed to run.
# Set DJANGO_STATIC_ROOT to collect them somewhere for a front web server instead.
STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("DJANGO_STATIC_ROOT") or None
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

X_FRAME_OPTIONS = "DENY"

# The dashboard (frontend/): Django's login; every page needs it.
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:overview"
LOGOUT_REDIRECT_URL = "frontend:login"
SESSION_COOKIE_HTTPONLY = True

# ---------------------------------------------------------------- the appliance itself

STORAGE_ROOT = Path(os.environ.get("STORAGE_ROOT") or VAR_DIR / "images")
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
APPLIANCE_NODE_NAME = os.environ.get("APPLIANCE_NODE_NAME") or socket.gethostname()
APPLIANCE_ROLE = env_choice("APPLIANCE_ROLE", ("all", "central", "node"), "all")
APPLIANCE_NODE_LABELS = env_labels("APPLIANCE_NODE_LABELS")
APPLIANCE_NODE_DOWN_AFTER = env_number("APPLIANCE_NODE_DOWN_AFTER", 15.0, minimum=1,
                                       maximum=86400, integer=False)
APPLIANCE_PROVISION_QUOTA = env_size("APPLIANCE_PROVISION_QUOTA", "64T")
APPLIANCE_IMAGE_MIN_SIZE = env_size("APPLIANCE_IMAGE_MIN_SIZE", "1M")
APPLIANCE_IMAGE_MAX_SIZE = env_size("APPLIANCE_IMAGE_MAX_SIZE", "16T")
APPLIANCE_STORAGE_RESERVE = env_size("APPLIANCE_STORAGE_RESERVE", "1G")

# ---------------------------------------------------------------- engine and Celery

NBD_BIND = os.environ.get("NBD_BIND") or "127.0.0.1"
NBD_PORT = int(os.environ.get("NBD_PORT") or 10809)
NBD_PUBLIC_HOST = os.environ.get("NBD_PUBLIC_HOST") or NBD_BIND
NBD_TLS_MODE = env_choice("NBD_TLS_MODE", ("off", "optional", "required"), "optional")
NBD_HANDSHAKE_TIMEOUT = env_number("NBD_HANDSHAKE_TIMEOUT", 10.0, minimum=0.1, maximum=3600,
                                   integer=False)
NBD_MAX_CONNECTIONS = env_number("NBD_MAX_CONNECTIONS", 1024, minimum=1, maximum=1_000_000)
NBD_MAX_OPTION_LENGTH = env_number("NBD_MAX_OPTION_LENGTH", 65536, minimum=8 << 10,
                                   maximum=16 << 20, size=True)
NBD_SPIN_US = env_number("NBD_SPIN_US", 50, minimum=0, maximum=10_000)
# The appliance's CA and server certificate live in the database (see appliance.pki);
# the engine reads the copies written here.
APPLIANCE_TLS_DIR = Path(os.environ.get("APPLIANCE_TLS_DIR") or VAR_DIR / "tls")
APPLIANCE_TLS_SERVER_NAMES = env_server_names("APPLIANCE_TLS_SERVER_NAMES")
APPLIANCE_HISTORY_RETENTION_S = int(os.environ.get("APPLIANCE_HISTORY_RETENTION") or 7 * 86400)
APPLIANCE_METRICS_TOKEN = os.environ.get("APPLIANCE_METRICS_TOKEN", "")

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "appliance"
CELERY_TASK_IGNORE_RESULT = True
# Only storage.run keeps its result: the host that asked a node to create, grow, clone or
# delete an image waits for the answer (appliance.storage.remote).
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
APPLIANCE_REMOTE_TIMEOUT = env_number("APPLIANCE_REMOTE_TIMEOUT", 120.0, minimum=1,
                                      maximum=3600, integer=False)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# An API call that queues engine.sync must not hang on a missing broker: fail fast, the
# reconcile beat applies the change anyway.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0,
                                    "interval_step": 0.2, "interval_max": 0.2}
CELERY_BEAT_SCHEDULE = {
    # The safety net under the on-commit syncs: converge every node, compare heartbeats.
    "engine-reconcile": {"task": "engine.reconcile", "schedule": 5.0,
                         "options": {"expires": 10}},
}

# ---------------------------------------------------------------- REST API

REST_FRAMEWORK = {
    # Token first: an unauthenticated request gets 401 with "WWW-Authenticate: Token".
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "appliance.api.pagination.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "appliance.api.exceptions.exception_handler",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "NBD appliance API",
    "DESCRIPTION": "Sparse disk images, their NBD exports and the clients that used them.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # A revocation reason is asked for and reported under two field names: one enum.
    "ENUM_NAME_OVERRIDES": {"RevocationReasonEnum": "appliance.pki.models.RevocationReason",
                            "NodeStatusEnum": "appliance.nodes.models.NodeStatus"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # Only the appliance's own loggers: nbdcore's stay as whoever runs the engine sets them.
    "loggers": {
        "appliance": {
            "handlers": ["console"],
            "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO"),
            "propagate": False,
        },
    },
}
