"""Reads of what the engines are doing now (Redis), for the API, the dashboard and /metrics.

Every reader tolerates Redis being away: it answers "unknown" rather than failing.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

from django.conf import settings

from . import mailbox

log = logging.getLogger(__name__)


def _client() -> Any:
    return _client_for(settings.REDIS_URL)


@functools.lru_cache(maxsize=4)
def _client_for(url: str) -> Any:
    """One client (and its connection pool) per URL, not one per call."""
    return mailbox.connect(url, timeout_s=0.5)


def export_live(name: str) -> dict[str, Any]:
    """Clients connected now, cumulative counters and rates of one export."""
    try:
        value = mailbox.read_export_live(_client(), name)
    except Exception as exc:
        log.warning("live counters unavailable: %s", exc)
        return {"available": False, "error": "live metrics store unreachable"}
    if value is None:
        return {"available": True, "serving": False, "clients": 0}
    value.update(available=True, serving=True)
    return value


def live_sessions() -> list[dict[str, Any]]:
    """Every connection engines reported in the last seconds (node, run, id, counters)."""
    try:
        return mailbox.read_live_sessions(_client())
    except Exception as exc:
        log.warning("live sessions unavailable: %s", exc)
        return []


def node_status(node: str) -> dict[str, Any]:
    try:
        beat = mailbox.read_heartbeat(_client(), node)
    except Exception:
        return {"node": node, "state": "unknown"}
    if beat is None:
        return {"node": node, "state": "down"}
    age = time.time() - float(beat.get("at", 0))
    beat.update(node=node, state="up" if age <= mailbox.HEARTBEAT_TTL_S else "down",
                age_s=round(age, 1))
    return beat


def live_by_session(sessions: list[Any]) -> dict[int, dict[str, Any]]:
    """For the active ClientSession rows given, the engine's live snapshot by row id."""
    active = [s for s in sessions if s.disconnected_at is None]
    if not active:
        return {}
    keys = [mailbox.session_live_key(s.node, s.engine_run, s.connection_id) for s in active]
    try:
        values = _client().mget(keys)
    except Exception as exc:
        log.warning("live sessions unavailable: %s", exc)
        return {}
    out: dict[int, dict[str, Any]] = {}
    for session, raw in zip(active, values, strict=True):
        if raw is not None:
            snapshot = json.loads(raw)
            out[session.pk] = {"stats": snapshot.get("stats", {}), "at": snapshot.get("at")}
    return out
