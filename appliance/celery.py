"""The Celery app: Redis broker, the engine queues, the reconcile beat, the engine bootstep."""

from __future__ import annotations

import os

from celery import Celery

from appliance.engine.supervisor import install_worker_step

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")

app = Celery("appliance")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["appliance.engine", "appliance.storage"])
install_worker_step(app)
