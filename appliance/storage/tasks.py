"""``storage.run``: a storage operation sent to the node that holds the image's file.

Routed to the node's queue ``engine.<node>`` by ``appliance.storage.remote.run_on_node``;
the only task whose result is stored (in Redis, for an hour): the caller waits for it.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from . import move  # noqa: F401  (registers storage.move and the move_in operation)
from .remote import execute


@shared_task(name="storage.run", ignore_result=False)
def storage_run(operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return execute(operation, arguments)
