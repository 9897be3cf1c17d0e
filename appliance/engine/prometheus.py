"""``/metrics`` in the Prometheus text format, with the official prometheus_client.

A custom collector reads the engines' live values from Redis at scrape time, so every
web process answers the same numbers and nothing is kept in memory between scrapes.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import mailbox


class EngineCollector:
    def collect(self) -> Iterator[Metric]:
        from appliance.exports.models import Export

        up = GaugeMetricFamily("nbd_engine_up", "1 if the node's engine beat recently",
                               labels=["node"])
        dropped = CounterMetricFamily("nbd_engine_metrics_dropped",
                                      "metric events the engine gave up on", labels=["node"])
        refusals = CounterMetricFamily(
            "nbd_engine_refusals", "connections refused since the engine started, by reason",
            labels=["node", "kind"])
        clients = GaugeMetricFamily("nbd_export_clients", "clients connected now",
                                    labels=["export"])
        ops = CounterMetricFamily("nbd_export_ops", "requests served", labels=["export", "op"])
        data = {
            key: CounterMetricFamily(f"nbd_export_{key}", help_text, labels=["export"])
            for key, help_text in (
                ("bytes_read", "data bytes sent to clients"),
                ("bytes_written", "bytes written by clients"),
                ("hole_bytes", "bytes answered as holes instead of zeroes"),
                ("zero_bytes", "bytes zeroed or trimmed"),
            )
        }
        errors = CounterMetricFamily("nbd_export_errors", "error replies",
                                     labels=["export", "errno"])
        latency = GaugeMetricFamily("nbd_export_latency_seconds_sum",
                                    "total request latency", labels=["export"])
        try:
            client = mailbox.connect(settings.REDIS_URL, timeout_s=0.5)
            nodes = set(Export.objects.values_list("node", flat=True))
            nodes.add(settings.APPLIANCE_NODE_NAME)
            for node in sorted(nodes):
                beat = mailbox.read_heartbeat(client, node)
                up.add_metric([node], 1.0 if beat else 0.0)
                if beat:
                    dropped.add_metric([node], float(beat.get("metrics_dropped", 0)))
                    for kind, count in (beat.get("refusals") or {}).items():
                        refusals.add_metric([node, kind], float(count))
            for name in Export.objects.values_list("name", flat=True):
                live: dict[str, Any] | None = mailbox.read_export_live(client, name)
                if not live:
                    continue
                clients.add_metric([name], float(live.get("clients", 0)))
                for op, count in live.get("ops", {}).items():
                    ops.add_metric([name, op], float(count))
                for key, family in data.items():
                    family.add_metric([name], float(live.get(key, 0)))
                for errno_name, count in live.get("errors", {}).items():
                    errors.add_metric([name, errno_name], float(count))
                latency.add_metric([name], live.get("latency_sum_us", 0) / 1e6)
        except Exception:
            pass  # Redis away: export what we have (nbd_engine_up stays empty)
        yield from (up, dropped, refusals, clients, ops, *data.values(), errors, latency)


def _authorized(request: HttpRequest) -> bool:
    """A logged-in user, an API token, or the scrape token APPLIANCE_METRICS_TOKEN."""
    if getattr(request, "user", None) is not None and request.user.is_authenticated:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme == "Bearer" and settings.APPLIANCE_METRICS_TOKEN:
        return hmac.compare_digest(credential, settings.APPLIANCE_METRICS_TOKEN)
    if scheme == "Token" and credential:
        from rest_framework.authtoken.models import Token

        return Token.objects.filter(key=credential, user__is_active=True).exists()
    return False


def metrics_view(request: HttpRequest) -> HttpResponse:
    if not _authorized(request):
        response = HttpResponse("authentication required\n", status=401,
                                content_type="text/plain")
        response["WWW-Authenticate"] = "Bearer"
        return response
    registry = CollectorRegistry()
    registry.register(EngineCollector())  # type: ignore[arg-type]
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
