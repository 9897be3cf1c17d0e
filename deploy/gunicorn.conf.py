"""gunicorn settings for the appliance's web side (API, admin, dashboard, /metrics)."""

import os

bind = f"{os.environ.get('WEB_BIND', '127.0.0.1')}:{os.environ.get('WEB_PORT', '8000')}"
workers = int(os.environ.get("WEB_WORKERS", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 120  # image imports stream large bodies
graceful_timeout = 30
accesslog = "-"
errorlog = "-"
wsgi_app = "appliance.wsgi:application"
