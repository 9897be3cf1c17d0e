"""Query filters of the list endpoints (django-filter)."""

from __future__ import annotations

import ipaddress

import django_filters as filters
from django.db import models
from django.db.models import Q, QuerySet

from appliance.exports.models import Export, TlsPolicy
from appliance.nodes.models import Node
from appliance.nodes.selectors import nodes_up
from appliance.sessions.models import (
    FEATURES,
    ClientSession,
    ConnectionRefusal,
    Fingerprint,
    RefusalKind,
)
from appliance.storage.models import Image


class StrictBooleanFilter(filters.ChoiceFilter):
    """``true``/``false`` (or ``1``/``0``); anything else is a 400 naming the parameter,
    where django-filter's own boolean filter would silently ignore it."""

    TRUE = ("true", "1")

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("choices", [(v, v) for v in ("true", "false", "1", "0")])
        super().__init__(*args, **kwargs)

    def filter(self, qs: QuerySet, value: str) -> QuerySet:  # (a ``method`` replaces this)
        if value in ("", None):
            return qs
        return qs.filter(**{self.field_name: value in self.TRUE})


_STRICT_BOOLEANS = {models.BooleanField: {"filter_class": StrictBooleanFilter}}


class ImageFilter(filters.FilterSet):
    class Meta:
        model = Image
        fields = {"name": ["exact", "icontains"], "cloned_from": ["exact"], "node": ["exact"]}


class NodeFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=[("up", "up"), ("down", "down")],
                                  method="filter_status", help_text="up or down")
    label = filters.CharFilter(method="filter_label", help_text="nodes having this label")

    class Meta:
        model = Node
        fields = ["name"]

    def filter_status(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        up = nodes_up().values("pk")
        return queryset.filter(pk__in=up) if value == "up" else queryset.exclude(pk__in=up)

    def filter_label(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        # JSON containment is not on SQLite: filter the (few) nodes in Python.
        names = [n.name for n in Node.objects.only("name", "labels") if value in n.labels]
        return queryset.filter(name__in=names)


class ExportFilter(filters.FilterSet):
    tls_policy = filters.ChoiceFilter(choices=TlsPolicy.choices)

    class Meta:
        model = Export
        fields = {
            "name": ["exact", "icontains"],
            "image": ["exact"],
            "enabled": ["exact"],
            "read_only": ["exact"],
            "multi_conn": ["exact"],
            "node": ["exact"],
        }
        filter_overrides = _STRICT_BOOLEANS


class ClientSessionFilter(filters.FilterSet):
    export = filters.ModelChoiceFilter(queryset=Export.objects.all(), help_text="export id")
    export_name = filters.CharFilter(help_text="export name as the client asked for it")
    peer = filters.CharFilter(
        method="filter_peer", help_text="client address (any port), or address:port exactly"
    )
    fingerprint = filters.MultipleChoiceFilter(
        choices=Fingerprint.choices, help_text="guessed client program; repeat for several"
    )
    since = filters.IsoDateTimeFilter(
        field_name="connected_at", lookup_expr="gte", help_text="connected at or after"
    )
    until = filters.IsoDateTimeFilter(
        field_name="connected_at", lookup_expr="lt", help_text="connected before"
    )
    active = StrictBooleanFilter(method="filter_active", help_text="still connected")
    feature = filters.MultipleChoiceFilter(
        choices=[(name, name) for name in FEATURES],
        method="filter_feature",
        help_text="negotiated this feature; repeat to require several",
    )

    class Meta:
        model = ClientSession
        fields = ["node", "via", *FEATURES]
        filter_overrides = _STRICT_BOOLEANS

    def filter_peer(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return _filter_peer(queryset, value)

    def filter_active(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(disconnected_at__isnull=value in StrictBooleanFilter.TRUE)

    def filter_feature(self, queryset: QuerySet, name: str, value: list[str]) -> QuerySet:
        return queryset.filter(**dict.fromkeys(value, True)) if value else queryset


class ConnectionRefusalFilter(filters.FilterSet):
    export_name = filters.CharFilter(help_text="export name as the client asked for it")
    kind = filters.MultipleChoiceFilter(
        choices=[(k, k) for k in RefusalKind.values if k],
        help_text="why it was refused; repeat for several",
    )
    peer = filters.CharFilter(
        method="filter_peer", help_text="client address (any port), or address:port exactly"
    )
    since = filters.IsoDateTimeFilter(
        field_name="at", lookup_expr="gte", help_text="refused at or after"
    )
    until = filters.IsoDateTimeFilter(field_name="at", lookup_expr="lt", help_text="refused before")

    class Meta:
        model = ConnectionRefusal
        fields = ["node"]

    def filter_peer(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return _filter_peer(queryset, value)


def _filter_peer(queryset: QuerySet, value: str) -> QuerySet:
    """An address matches any port (IPv4-mapped addresses are stored as IPv4)."""
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return queryset.filter(peer=value)
    return queryset.filter(Q(peer_address=str(address)))
