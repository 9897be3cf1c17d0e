"""Redis keys shared by the control tasks, the engine process and the API.

Everything here is small JSON under ``nbd:`` keys; live values carry a TTL so that a dead
engine's numbers vanish instead of freezing.
"""

from __future__ import annotations

import json
from typing import Any

import redis

PREFIX = "nbd"
HEARTBEAT_TTL_S = 15
LIVE_TTL_S = 10


def connect(url: str, *, timeout_s: float = 1.0) -> redis.Redis:
    """A client that fails fast: an engine must never wait long on its metrics."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


def desired_key(node: str) -> str:
    return f"{PREFIX}:engine:{node}:desired"


def heartbeat_key(node: str) -> str:
    return f"{PREFIX}:engine:{node}:heartbeat"


def export_live_key(name: str) -> str:
    return f"{PREFIX}:live:export:{name}"


def session_live_key(node: str, run: str, conn_id: int) -> str:
    return f"{PREFIX}:live:session:{node}:{run}:{conn_id}"


def session_live_pattern() -> str:
    return f"{PREFIX}:live:session:*"


def read_json(client: redis.Redis, key: str) -> Any | None:
    raw = client.get(key)
    return None if raw is None else json.loads(raw)


def read_heartbeat(client: redis.Redis, node: str) -> dict[str, Any] | None:
    value = read_json(client, heartbeat_key(node))
    return value if isinstance(value, dict) else None


def read_export_live(client: redis.Redis, name: str) -> dict[str, Any] | None:
    value = read_json(client, export_live_key(name))
    return value if isinstance(value, dict) else None


def read_live_sessions(client: redis.Redis) -> list[dict[str, Any]]:
    keys = list(client.scan_iter(match=session_live_pattern(), count=500))
    if not keys:
        return []
    return [json.loads(raw) for raw in client.mget(keys) if raw is not None]
