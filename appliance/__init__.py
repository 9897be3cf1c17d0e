"""The NBD appliance: Django project, Celery app (``appliance.celery.app``), domain apps."""

from .celery import app as celery_app

__all__ = ["celery_app"]
