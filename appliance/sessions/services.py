"""Recording client sessions from the engine's observations.

``session_record_from_engine`` is what the engine worker (issue 4) calls from its
observer: with the ``ConnectionInfo.snapshot()`` dict when a handshake finishes, while the
client is connected (counters), and when it disconnects. Each call creates or updates the
one row of that connection, so calls may repeat; a snapshot older than what is stored (an
open connection's, after the close was recorded) changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction

from appliance.errors import InvalidEngineSnapshot
from appliance.exports.models import Export

from .fingerprint import guess_fingerprint, negotiation_signature
from .models import ClientSession, ConnectionRefusal, ExportSample, Fingerprint

__all__ = [
    "MULTI_CONN_WINDOW",
    "export_sample_prune",
    "export_sample_record",
    "parse_peer",
    "refusal_prune",
    "refusal_record_from_engine",
    "session_record_from_engine",
]

log = logging.getLogger(__name__)

# Connections from one client, with one negotiation, opened this close together and
# overlapping in time, are one multi-conn program (nbdcopy), not several qemu processes.
MULTI_CONN_WINDOW = timedelta(seconds=1)
MULTI_CONN_REASON = (
    "qemu's negotiation on several concurrent connections from one client to one export: "
    "libnbd multi-conn (nbdcopy); qemu opens a single connection"
)


def session_record_from_engine(
    *, snapshot: Mapping[str, Any], node: str | None = None, engine_run: str = ""
) -> ClientSession:
    """Create or update the ClientSession of one engine connection.

    ``snapshot`` is ``nbdcore.stats.ConnectionInfo.snapshot()``; ``node`` the host whose
    engine saw it (default: this one); ``engine_run`` tells engine processes on one node
    apart (connection ids restart at 1 in each).
    """
    fields = _fields_from_snapshot(snapshot)
    key = {
        "node": node or settings.APPLIANCE_NODE_NAME,
        "engine_run": engine_run,
        "connection_id": fields.pop("connection_id"),
        "connected_at": fields.pop("connected_at"),
    }
    with transaction.atomic():
        # The export first, then the session: the lock order of export_delete, which
        # detaches an export's sessions before deleting it (see there).
        fields["export"] = _export_for_session(fields["export_name"])
        session = ClientSession.objects.select_for_update().filter(**key).first()
        if session is None:
            try:
                with transaction.atomic():
                    session = ClientSession.objects.create(**key, **fields)
            except IntegrityError:  # recorded meanwhile by another call
                session = ClientSession.objects.select_for_update().get(**key)
                _update(session, fields)
        else:
            _update(session, fields)
        _refine_multi_conn(session)
    return session


def _export_for_session(name: str) -> Export | None:
    """The export a session names, locked until the session is written (so that it cannot
    be deleted in between), or None when there is none (any more). The lock is the weakest
    one that a deletion waits for (FOR NO KEY UPDATE): it does not block foreign-key
    checks of other rows."""
    if not name:
        return None
    no_key = connection.features.has_select_for_no_key_update
    return Export.objects.select_for_update(no_key=no_key).filter(name=name).first()


def _update(session: ClientSession, fields: dict[str, Any]) -> None:
    if session.disconnected_at is not None and fields["disconnected_at"] is None:
        return  # a stale snapshot of the open connection: the close is already recorded
    if (
        fields["fingerprint"] == Fingerprint.QEMU
        and session.fingerprint == Fingerprint.LIBNBD
        and session.fingerprint_reason == MULTI_CONN_REASON
    ):
        fields = {k: v for k, v in fields.items() if k not in ("fingerprint", "fingerprint_reason")}
    for name, value in fields.items():
        setattr(session, name, value)
    session.save()


def _refine_multi_conn(session: ClientSession) -> None:
    if session.fingerprint != Fingerprint.QEMU or session.peer_address is None:
        return
    start = session.connected_at
    siblings = ClientSession.objects.filter(
        node=session.node,
        engine_run=session.engine_run,
        peer_address=session.peer_address,
        export_name=session.export_name,
        fingerprint__in=[Fingerprint.QEMU, Fingerprint.LIBNBD],
        connected_at__range=(start - MULTI_CONN_WINDOW, start + MULTI_CONN_WINDOW),
    ).exclude(pk=session.pk)
    end = session.disconnected_at
    signature = negotiation_signature(session.negotiated)
    matched = [
        other.pk
        for other in siblings
        if (end is None or other.connected_at <= end)
        and (other.disconnected_at is None or other.disconnected_at >= start)
        and negotiation_signature(other.negotiated) == signature
    ]
    if matched:
        ClientSession.objects.filter(pk__in=[session.pk, *matched]).update(
            fingerprint=Fingerprint.LIBNBD, fingerprint_reason=MULTI_CONN_REASON
        )
        session.fingerprint, session.fingerprint_reason = Fingerprint.LIBNBD, MULTI_CONN_REASON


def parse_peer(peer: str) -> tuple[str | None, int | None]:
    """``"192.0.2.1:5000"`` or ``"[2001:db8::1]:5000"`` -> (address, port); else Nones."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return None, None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None, None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port)


def _timestamp(value: object, name: str, *, required: bool) -> datetime | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEngineSnapshot(f"snapshot {name} must be a UNIX time; got {value!r}")
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidEngineSnapshot(f"snapshot {name} is out of range: {value!r}") from exc


def _json_object(snapshot: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A JSON round trip: what is returned is exactly what the JSONField will hold."""
    value = snapshot.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidEngineSnapshot(f"snapshot {name} must be an object; got {value!r}")
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise InvalidEngineSnapshot(f"snapshot {name} is not JSON: {exc}") from exc


def _count(stats: Mapping[str, Any], name: str) -> int:
    value = stats.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidEngineSnapshot(f"snapshot stats.{name} must be a count; got {value!r}")
    return value


def _snapshot_identity(snapshot: object) -> tuple[int, str]:
    """The connection id and peer every engine snapshot carries, checked."""
    if not isinstance(snapshot, Mapping):
        raise InvalidEngineSnapshot(f"an engine snapshot is an object; got {type(snapshot)}")
    connection_id = snapshot.get("id")
    if isinstance(connection_id, bool) or not isinstance(connection_id, int):
        raise InvalidEngineSnapshot(f"snapshot id must be an integer; got {connection_id!r}")
    peer = snapshot.get("peer")
    if not isinstance(peer, str):
        raise InvalidEngineSnapshot(f"snapshot peer must be a string; got {peer!r}")
    return connection_id, peer


def _fields_from_snapshot(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    connection_id, peer = _snapshot_identity(snapshot)
    negotiated = _json_object(snapshot, "negotiated")
    stats = _json_object(snapshot, "stats")
    options = negotiated.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, Mapping) for o in options):
        raise InvalidEngineSnapshot("snapshot negotiated.options must be a list of objects")
    export_name = snapshot.get("export") or negotiated.get("export_name") or ""
    if not isinstance(export_name, str):
        raise InvalidEngineSnapshot(f"snapshot export must be a string; got {export_name!r}")

    names = {str(o.get("name", "")) for o in options}
    contexts = [str(c) for c in negotiated.get("meta_contexts") or []]
    ops = stats.get("ops") or {}
    errors = stats.get("errors") or {}
    if not isinstance(ops, Mapping) or not isinstance(errors, Mapping):
        raise InvalidEngineSnapshot("snapshot stats.ops and stats.errors must be objects")
    address, port = parse_peer(peer)
    fingerprint, reason = guess_fingerprint(negotiated)
    return {
        "connection_id": connection_id,
        "connected_at": _timestamp(snapshot.get("opened_at"), "opened_at", required=True),
        "disconnected_at": _timestamp(snapshot.get("closed_at"), "closed_at", required=False),
        "close_reason": str(snapshot.get("close_reason") or "")[:500],
        "export_name": export_name,
        "peer": peer[:300],
        "peer_address": address,
        "peer_port": port,
        "negotiated": negotiated,
        "stats": stats,
        "via": str(negotiated.get("via") or ""),
        "fingerprint": fingerprint,
        "fingerprint_reason": reason,
        "fixed_newstyle": bool(negotiated.get("fixed_newstyle")),
        "no_zeroes": bool(negotiated.get("no_zeroes")),
        "structured_replies": bool(negotiated.get("structured_replies")),
        "extended_headers": bool(negotiated.get("extended_headers")),
        "meta_context": bool(contexts),
        "base_allocation": "base:allocation" in contexts,
        "block_size_requested": bool(negotiated.get("block_size_requested")),
        "tls": bool(negotiated.get("tls")),
        "opt_go": "GO" in names,
        "opt_export_name": "EXPORT_NAME" in names,
        "opt_info": "INFO" in names,
        "opt_list": "LIST" in names,
        "opt_list_meta_context": "LIST_META_CONTEXT" in names,
        "opt_starttls": "STARTTLS" in names,
        "ops_total": sum(_count(ops, k) for k in ops),
        "reads": _count(ops, "READ"),
        "writes": _count(ops, "WRITE"),
        "bytes_read": _count(stats, "bytes_read"),
        "bytes_written": _count(stats, "bytes_written"),
        "hole_bytes": _count(stats, "hole_bytes"),
        "zero_bytes": _count(stats, "zero_bytes"),
        "errors_total": sum(_count(errors, k) for k in errors),
    }


def export_sample_record(
    *, export_name: str, node: str, totals: Mapping[str, Any], at: float
) -> ExportSample:
    """Store one history sample from the engine's per-export totals (EngineMetrics)."""
    latency = totals.get("latency_counts") or []
    return ExportSample.objects.create(
        export_name=export_name,
        node=node,
        at=datetime.fromtimestamp(at, tz=UTC),
        clients=int(totals.get("clients", 0)),
        sessions=int(totals.get("sessions", 0)),
        ops=sum(int(n) for n in (totals.get("ops") or {}).values()),
        bytes_read=int(totals.get("bytes_read", 0)),
        bytes_written=int(totals.get("bytes_written", 0)),
        hole_bytes=int(totals.get("hole_bytes", 0)),
        zero_bytes=int(totals.get("zero_bytes", 0)),
        errors=sum(int(n) for n in (totals.get("errors") or {}).values()),
        latency_sum_us=int(totals.get("latency_sum_us", 0)),
        latency_count=sum(int(n) for n in latency),
    )


def export_sample_prune(*, older_than_s: int) -> int:
    """Delete history samples past the retention; returns how many went."""
    cutoff = datetime.now(tz=UTC) - timedelta(seconds=older_than_s)
    deleted, _ = ExportSample.objects.filter(at__lt=cutoff).delete()
    return deleted


def refusal_record_from_engine(
    *, snapshot: Mapping[str, Any], node: str | None = None, engine_run: str = ""
) -> ConnectionRefusal:
    """Store a connection the engine refused (``ConnectionInfo.snapshot()`` given to the
    observer's ``connection_refused``). Recording the same snapshot twice stores one row."""
    connection_id, peer = _snapshot_identity(snapshot)
    when = snapshot.get("closed_at")
    at = _timestamp(snapshot.get("opened_at") if when is None else when, "closed_at",
                    required=True)
    export_name = snapshot.get("requested_export") or snapshot.get("export") or ""
    if not isinstance(export_name, str):
        raise InvalidEngineSnapshot(
            f"snapshot requested_export must be a string; got {export_name!r}")
    names = snapshot.get("tls_names") or []
    if not isinstance(names, list | tuple):
        raise InvalidEngineSnapshot(f"snapshot tls_names must be a list; got {names!r}")
    negotiated = snapshot.get("negotiated") or {}
    reason = snapshot.get("refusal") or snapshot.get("close_reason") or ""
    key = {
        "node": node or settings.APPLIANCE_NODE_NAME,
        "engine_run": engine_run,
        "connection_id": connection_id,
        "at": at,
    }
    fields = {
        "peer": peer[:300],
        "peer_address": parse_peer(peer)[0],
        "export_name": export_name[:4096],
        "kind": str(snapshot.get("refusal_kind") or "")[:32],
        "reason": str(reason)[:500],
        "tls": bool(isinstance(negotiated, Mapping) and negotiated.get("tls")),
        "tls_names": [str(n)[:255] for n in names][:16],
    }
    try:
        with transaction.atomic():
            refusal, _ = ConnectionRefusal.objects.get_or_create(**key, defaults=fields)
    except IntegrityError:  # recorded meanwhile by another call
        refusal = ConnectionRefusal.objects.get(**key)
    return refusal


def refusal_prune(*, older_than_s: int) -> int:
    """Delete refusals past the retention (the history samples'); returns how many went."""
    cutoff = datetime.now(tz=UTC) - timedelta(seconds=older_than_s)
    deleted, _ = ConnectionRefusal.objects.filter(at__lt=cutoff).delete()
    return deleted
