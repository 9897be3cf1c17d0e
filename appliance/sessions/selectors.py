"""Reads about client sessions: lists and the negotiated-feature statistics."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from .models import FEATURES, ClientSession, ConnectionRefusal, ExportSample


def session_list() -> QuerySet[ClientSession]:
    return ClientSession.objects.select_related("export")


def refusal_list(*, export_name: str | None = None) -> QuerySet[ConnectionRefusal]:
    """Refused connections, newest first (of one export name when given)."""
    refusals = ConnectionRefusal.objects.order_by("-at", "-id")
    if export_name is not None:
        refusals = refusals.filter(export_name=export_name)
    return refusals


def session_feature_stats(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    export_name: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """Share of sessions that negotiated each feature, overall and per fingerprint.

    One grouped query over the (fingerprint, connected_at, features...) index, however
    many sessions and fingerprints there are. ``since`` is inclusive, ``until`` exclusive
    (both on the connect time). A share is ``None`` when there are no sessions.
    """
    sessions = ClientSession.objects.all()
    if since is not None:
        sessions = sessions.filter(connected_at__gte=since)
    if until is not None:
        sessions = sessions.filter(connected_at__lt=until)
    if export_name:
        sessions = sessions.filter(export_name=export_name)
    if node:
        sessions = sessions.filter(node=node)
    # Aliased: an annotation may not share a name with a model field.
    counts = {f"n_{name}": Count("pk", filter=Q(**{name: True})) for name in FEATURES}
    rows = (
        sessions.order_by()
        .values("fingerprint")
        .annotate(n_sessions=Count("pk"), **counts)
        .order_by("fingerprint")
    )
    overall = dict.fromkeys(FEATURES, 0)
    total = 0
    by_fingerprint: dict[str, Any] = {}
    for row in rows:
        row_counts = {name: row[f"n_{name}"] for name in FEATURES}
        total += row["n_sessions"]
        for name in FEATURES:
            overall[name] += row_counts[name]
        by_fingerprint[row["fingerprint"]] = {
            "sessions": row["n_sessions"],
            "features": _shares(row_counts, row["n_sessions"]),
        }
    return {
        "since": since,
        "until": until,
        "sessions": total,
        "features": _shares(overall, total),
        "by_fingerprint": by_fingerprint,
    }


def _shares(counts: dict[str, int], total: int) -> dict[str, dict[str, Any]]:
    return {
        name: {"sessions": counts[name], "share": round(counts[name] / total, 4) if total else None}
        for name in FEATURES
    }


def export_history(*, export_name: str, seconds: int = 3600) -> QuerySet[ExportSample]:
    """The export's history samples of the last ``seconds``, oldest first."""
    since = timezone.now() - timedelta(seconds=seconds)
    return ExportSample.objects.filter(export_name=export_name, at__gte=since).order_by("at")
