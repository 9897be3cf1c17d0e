"""Short, idempotent control tasks: they converge Redis (and so the engines) on the database.

``engine.sync`` writes one node's desired exports; ``engine.reconcile`` (on the beat) does
it for every node, compares with the heartbeats, and prunes old history samples and
refusals. Running either twice, late or concurrently is harmless.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from django.conf import settings

from . import mailbox
from .spec import EngineSpec, desired_spec

log = logging.getLogger(__name__)


def engine_queue(node: str) -> str:
    return f"engine.{node}"


def _redis() -> Any:
    return mailbox.connect(settings.REDIS_URL)


def _publish_desired(client: Any, node: str) -> EngineSpec:
    """Write the exports ``node`` should serve where its engine polls for them."""
    spec = desired_spec(node)
    client.set(mailbox.desired_key(node), spec.to_json())
    return spec


@shared_task(name="engine.sync", ignore_result=True)
def engine_sync(node: str) -> str:
    return _publish_desired(_redis(), node).digest


@shared_task(name="engine.reconcile", ignore_result=True)
def engine_reconcile() -> dict[str, Any]:
    from appliance.exports.models import Export
    from appliance.sessions.services import export_sample_prune, refusal_prune
    from appliance.storage.remote import is_local

    client = _redis()
    nodes = set(Export.objects.values_list("node", flat=True))
    if is_local(settings.APPLIANCE_NODE_NAME):
        nodes.add(settings.APPLIANCE_NODE_NAME)
    report: dict[str, Any] = {}
    for node in sorted(nodes):
        beat = mailbox.read_heartbeat(client, node)
        down = beat is None or time.time() - float(beat.get("at", 0)) > mailbox.HEARTBEAT_TTL_S
        if not is_local(node):
            # A spec names the node's own file paths and TLS files: its worker computes it.
            # A node whose engine is not beating gets nothing queued (its queue would only
            # fill with expired syncs); the first reconcile after it comes back syncs it.
            if not down:
                request_sync(node)
            report[node] = {"state": "down" if down else "ok",
                            "digest": None if beat is None else beat.get("digest")}
            continue
        spec = _publish_desired(client, node)
        if down:
            state = "down"
        elif beat is not None and beat.get("digest") != spec.digest:
            state = "converging"
        else:
            state = "ok"
        if state != "ok":
            log.warning("engine on node %s: %s", node, state)
        report[node] = {"state": state, "digest": spec.digest, "exports": len(spec.exports)}
    export_sample_prune(older_than_s=settings.APPLIANCE_HISTORY_RETENTION_S)
    refusal_prune(older_than_s=settings.APPLIANCE_HISTORY_RETENTION_S)
    return report


def request_sync(node: str) -> None:
    """Ask the node's engine worker to converge now; the beat catches up if this fails."""
    try:
        engine_sync.apply_async(args=[node], queue=engine_queue(node), expires=60)
    except Exception as exc:  # broker away: the API call must still succeed
        log.warning("could not queue engine.sync for %s (%s); reconcile will apply it",
                    node, exc)
