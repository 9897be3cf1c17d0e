"""What services call when the database changed something an engine serves."""

from __future__ import annotations

from django.db import transaction


def sync_on_commit(*nodes: str) -> None:
    """Once the current transaction commits, ask each node's engine to converge."""
    from .tasks import request_sync

    for node in dict.fromkeys(n for n in nodes if n):
        transaction.on_commit(lambda node=node: request_sync(node))
