"""Dashboard pages. Reads go through the selectors, writes through the services: the same
rules as the REST API, with the refusals shown beside the form fields."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from appliance.engine.live import export_live, live_by_session, node_status
from appliance.errors import ApplianceError, human_size
from appliance.exports.models import Export, TlsPolicy
from appliance.exports.selectors import (
    export_address,
    export_list,
    export_requires_tls,
    export_tls_uri,
    export_uri,
    server_tls_mode,
)
from appliance.exports.services import export_delete, export_publish, export_update
from appliance.nodes.models import Node
from appliance.nodes.selectors import node_heartbeat_age, node_is_up, node_list, node_map
from appliance.sessions.models import FEATURES, Fingerprint, RefusalKind
from appliance.sessions.selectors import refusal_list, session_feature_stats, session_list
from appliance.storage.selectors import image_list, storage_usage
from appliance.storage.services import (
    image_clone,
    image_create,
    image_create_from_upload,
    image_delete,
    image_grow,
)

from .csp import csp
from .forms import (
    ClientCertificateForm,
    ExportAccessForm,
    ExportCreateForm,
    ImageCloneForm,
    ImageCreateForm,
    ImageGrowForm,
    ImageImportForm,
    ImageMoveForm,
    PskIdentityForm,
    call_service,
)
from .templatetags.dashboard import size

FEATURE_LABELS = {
    "fixed_newstyle": "fixed newstyle",
    "no_zeroes": "NO_ZEROES",
    "structured_replies": "structured replies",
    "extended_headers": "extended headers",
    "meta_context": "meta context",
    "base_allocation": "base:allocation",
    "block_size_requested": "block sizes",
    "tls": "TLS",
    "opt_go": "NBD_OPT_GO",
    "opt_export_name": "NBD_OPT_EXPORT_NAME",
    "opt_info": "NBD_OPT_INFO",
    "opt_list": "NBD_OPT_LIST",
    "opt_list_meta_context": "NBD_OPT_LIST_META_CONTEXT",
    "opt_starttls": "NBD_OPT_STARTTLS",
}
PERIODS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


def page(view: Any) -> Any:
    """A dashboard page: login required, Content-Security-Policy set."""
    return csp(login_required(view))


# ------------------------------------------------------------------ helpers


def _node_state(name: str, nodes: dict[str, Node], now: Any = None) -> dict[str, Any]:
    """How the dashboard shows a node a row names: up, down, or never registered."""
    node = nodes.get(name)
    if node is None:
        return {"name": name, "state": "unknown", "up": False, "age": None}
    up = node_is_up(node, now=now)
    return {"name": name, "state": "up" if up else "down", "up": up,
            "age": node_heartbeat_age(node, now=now)}


def _image_rows(images: Any) -> list[dict[str, Any]]:
    images = list(images)
    nodes = node_map({image.node for image in images})
    now = timezone.now()
    rows = []
    for image in images:
        usage = image.usage  # image_list() reads the sizes of a whole page at once
        virtual = usage.virtual_size or 0
        allocated = usage.allocated_size or 0
        percent = min(100.0, 100.0 * allocated / virtual) if virtual else 0.0
        rows.append({
            "image": image,
            "virtual": usage.virtual_size,
            "allocated": usage.allocated_size,
            "percent": round(percent, 1),
            "bar_width": f"{max(percent, 0.5 if allocated else 0):.1f}",
            "exports": [e.name for e in image.exports.all()],
            "node": _node_state(image.node, nodes, now),
        })
    return rows


def _export_rows(exports: Any) -> list[dict[str, Any]]:
    exports = list(exports)
    nodes = node_map()
    now = timezone.now()
    return [{"export": e, "uri": export_uri(e, nodes=nodes),
             "node": _node_state(e.node, nodes, now)} for e in exports]


def size_text(n: int) -> str:
    """The shortest exact way to type a size: ``10G``, ``1536M``, ``4096``."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _commands(uri: str, name: str) -> list[tuple[str, str]]:
    local = f"{name or 'disk'}.raw"
    return [
        ("nbdinfo", f"nbdinfo {uri}"),
        ("qemu-img", f"qemu-img info {uri}"),
        ("qemu-img convert", f"qemu-img convert -p -f raw -O qcow2 {uri} {name or 'disk'}.qcow2"),
        ("nbdcopy", f"nbdcopy --progress {uri} {local}"),
        ("qemu-system-x86_64",
         f"qemu-system-x86_64 -m 2048 -drive file={uri},format=raw,if=virtio"),
    ]


def client_dir(client: str) -> str:
    """Where the commands shown expect a client's ca-cert.pem, client-cert.pem and
    client-key.pem (the layout qemu's tls-creds-x509 and libnbd's tls-certificates read)."""
    return f"$HOME/nbd-tls/{client}"


def _tls_commands(export: Export, client: str) -> list[tuple[str, str]]:
    """The same commands over TLS with the certificates of ``client``."""
    directory = client_dir(client)
    uri = f"{export_tls_uri(export)}?tls-certificates={directory}"
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={directory}"
    host, port = export_address(export)
    nbd = f"host={host},port={port},export={export.name},tls-creds=tls0"
    file_nbd = ",".join(f"file.{part}" for part in nbd.split(","))
    return [
        ("nbdinfo", f'nbdinfo "{uri}"'),
        ("qemu-img", f"qemu-img info --object {creds} --image-opts driver=raw,file.driver=nbd,"
                     f"{file_nbd}"),
        ("nbdcopy", f'nbdcopy --progress "{uri}" {export.name}.raw'),
        ("qemu-system-x86_64",
         f"qemu-system-x86_64 -m 2048 -object {creds} -drive driver=raw,file.driver=nbd,"
         f"{file_nbd},if=virtio"),
    ]


def _connect_context(export: Export) -> dict[str, Any]:
    """The URIs and command lines an export's page offers, as its TLS policy allows."""
    uri = export_uri(export)
    tls_uri = export_tls_uri(export)
    client = export.allowed_clients[0] if export.allowed_clients else "CLIENT"
    plain = [] if export_requires_tls(export) else _commands(uri, export.name)
    return {
        "uri": uri, "tls_uri": tls_uri, "commands": plain,
        "tls_commands": _tls_commands(export, client) if tls_uri else [],
        "tls_client_dir": client_dir(client),
        "tls_unavailable": server_tls_mode() == "off" and export_requires_tls(export),
    }


def _total(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    if isinstance(value, dict):
        return int(sum(value.values()))
    if isinstance(value, list):
        return int(sum(value))
    return int(value or 0)


def _client_rows(sessions: list[Any]) -> list[dict[str, Any]]:
    live = live_by_session(sessions)
    rows = []
    for session in sessions:
        negotiated = session.negotiated or {}
        stats = (live.get(session.pk) or {}).get("stats")
        if stats:
            ops = stats.get("ops", {})
            counters = {
                "ops": _total(stats, "ops"),
                "reads": int(ops.get("READ", 0)),
                "writes": int(ops.get("WRITE", 0)),
                "bytes_read": int(stats.get("bytes_read", 0)),
                "bytes_written": int(stats.get("bytes_written", 0)),
                "errors": _total(stats, "errors"),
            }
            count = _total(stats, "latency_counts")
            latency = stats.get("latency_sum_us", 0) / count / 1000 if count else None
        else:
            counters = {
                "ops": session.ops_total, "reads": session.reads, "writes": session.writes,
                "bytes_read": session.bytes_read, "bytes_written": session.bytes_written,
                "errors": session.errors_total,
            }
            latency = None
        block = negotiated.get("block_size")
        rows.append({
            "session": session,
            "counters": counters,
            "latency_ms": latency,
            "live": stats is not None,
            "features": [
                ("structured replies", session.structured_replies),
                ("extended headers", session.extended_headers),
                ("NO_ZEROES", session.no_zeroes),
                ("TLS", session.tls),
            ],
            "meta_contexts": negotiated.get("meta_contexts") or [],
            "block_size": " / ".join(size(int(b)) for b in block) if block else None,
            "block_size_requested": session.block_size_requested,
        })
    return rows


def _active_sessions(export: Export | None = None) -> list[Any]:
    sessions = session_list().filter(disconnected_at__isnull=True).order_by("connected_at")
    if export is not None:
        sessions = sessions.filter(export=export)
    return list(sessions[:200])


# ------------------------------------------------------------------ overview


@page
@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/overview.html", {
        "nav": "overview", **_overview_context(), "usage": storage_usage(),
    })


def _overview_context() -> dict[str, Any]:
    exports = list(export_list())
    rows = []
    for export in exports:
        live = export_live(export.name)
        rows.append({"export": export, "uri": export_uri(export), "live": live,
                     "clients": live.get("clients", 0) if live.get("serving") else 0})
    sessions = _client_rows(_active_sessions())
    return {"exports": rows, "sessions": sessions, "client_count": len(sessions)}


@page
@require_GET
def overview_panel(request: HttpRequest) -> HttpResponse:
    """The live part of the overview: a template partial the page polls."""
    return render(request, "frontend/_overview_panel.html", _overview_context())


@login_required
@require_GET
def overview_rates(request: HttpRequest) -> JsonResponse:
    """Throughput of every export now, for the overview's plot."""
    exports = []
    for export in export_list():
        live = export_live(export.name)
        exports.append({
            "id": export.pk,
            "name": export.name,
            "clients": live.get("clients", 0) if live.get("serving") else 0,
            "bytes_read_per_s": live.get("bytes_read_per_s", 0.0),
            "bytes_written_per_s": live.get("bytes_written_per_s", 0.0),
            "ops_per_s": live.get("ops_per_s", 0.0),
            "at": live.get("at"),
        })
    return JsonResponse({"at": timezone.now().timestamp(), "exports": exports})


# ------------------------------------------------------------------ images


@page
@require_http_methods(["GET", "POST"])
def images(request: HttpRequest) -> HttpResponse:
    create = ImageCreateForm(prefix="create")
    upload = ImageImportForm(prefix="import")
    if request.method == "POST":
        if "create-name" in request.POST:
            create = ImageCreateForm(request.POST, prefix="create")
            if create.is_valid():
                data = create.cleaned_data
                image = call_service(create, image_create, name=data["name"],
                                     size=data["size"], description=data["description"],
                                     node=data["node"] or None, labels=data["labels"])
                if image is not None:
                    messages.success(request, f"Created image {image.name} "
                                              f"({human_size(image.size)}) on {image.node}.")
                    return redirect("frontend:images")
        else:
            upload = ImageImportForm(request.POST, request.FILES, prefix="import")
            if upload.is_valid():
                data = upload.cleaned_data
                file = data["file"]
                image = call_service(
                    upload, image_create_from_upload, fields={"size": "file"},
                    name=data["name"], description=data["description"], stream=file,
                    length=file.size, node=data["node"] or None, labels=data["labels"],
                )
                if image is not None:
                    messages.success(request, f"Imported image {image.name} "
                                              f"({human_size(image.size)}) on {image.node}.")
                    return redirect("frontend:images")
        status = 400
    else:
        status = 200
    return render(request, "frontend/images.html", {
        "nav": "images", "rows": _image_rows(image_list().order_by("name")),
        "create": create, "upload": upload, "usage": storage_usage(),
    }, status=status)


@page
@require_http_methods(["GET", "POST"])
def image_detail(request: HttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(image_list(), pk=pk)
    grow = ImageGrowForm(prefix="grow", initial={"size": size_text(image.size)})
    clone = ImageCloneForm(prefix="clone", initial={"name": f"{image.name}-clone"})
    move = ImageMoveForm(prefix="move", current=image.node)
    status = 200
    if request.method == "POST":
        status = 400
        if "move-node" in request.POST:
            move = ImageMoveForm(request.POST, prefix="move", current=image.node)
            if move.is_valid():
                from appliance.storage.move import image_move_start

                if call_service(move, image_move_start, image=image,
                                node=move.cleaned_data["node"]) is not None:
                    messages.success(request, f"Moving {image.name} to "
                                              f"{move.cleaned_data['node']}: its exports are "
                                              "read-only until the copy is verified.")
                    return redirect("frontend:image", pk=image.pk)
        elif "grow-size" in request.POST:
            grow = ImageGrowForm(request.POST, prefix="grow")
            if grow.is_valid():
                done = call_service(grow, image_grow, image=image, size=grow.cleaned_data["size"],
                                    force=grow.cleaned_data["force"])
                if done is not None:
                    messages.success(request, f"Image {image.name} is now "
                                              f"{human_size(done.size)}.")
                    return redirect("frontend:image", pk=image.pk)
        else:
            clone = ImageCloneForm(request.POST, prefix="clone")
            if clone.is_valid():
                copy = call_service(clone, image_clone, source=image, **clone.cleaned_data)
                if copy is not None:
                    messages.success(request, f"Cloned {image.name} to {copy.name}.")
                    return redirect("frontend:image", pk=copy.pk)
    return render(request, "frontend/image_detail.html", {
        "nav": "images", "image": image, "row": _image_rows([image])[0],
        "grow": grow, "clone": clone, "move": move,
    }, status=status)


@page
@require_http_methods(["GET", "POST"])
def image_confirm_delete(request: HttpRequest, pk: int) -> HttpResponse:
    image = get_object_or_404(image_list(), pk=pk)
    error = None
    if request.method == "POST":
        try:
            image_delete(image=image)
        except ApplianceError as exc:
            error = exc.message
        else:
            messages.success(request, f"Deleted image {image.name}.")
            return redirect("frontend:images")
    return render(request, "frontend/confirm_delete.html", {
        "nav": "images", "kind": "image", "object": image, "error": error,
        "cancel": "frontend:image",
        "consequence": "Its file and every byte in it are removed; this cannot be undone.",
    }, status=409 if error else 200)


# ------------------------------------------------------------------ exports


@page
@require_http_methods(["GET", "POST"])
def exports(request: HttpRequest) -> HttpResponse:
    form = ExportCreateForm(initial={"image": request.GET.get("image")})
    status = 200
    if request.method == "POST":
        form = ExportCreateForm(request.POST)
        status = 400
        if form.is_valid():
            export = call_service(form, export_publish, **form.cleaned_data)
            if export is not None:
                messages.success(request, f"Published {export.image.name} as {export.name}.")
                return redirect("frontend:export", pk=export.pk)
    rows = _export_rows(export_list())
    return render(request, "frontend/exports.html", {
        "nav": "exports", "rows": rows, "form": form,
    }, status=status)


@page
@require_http_methods(["GET", "POST"])
def export_detail(request: HttpRequest, pk: int) -> HttpResponse:
    export = get_object_or_404(export_list(), pk=pk)
    access = ExportAccessForm(prefix="access", initial={
        "allowed_networks": export.allowed_networks, "tls_policy": export.tls_policy,
        "allowed_clients": export.allowed_clients, "max_connections": export.max_connections,
    })
    status = 200
    if request.method == "POST":
        access = ExportAccessForm(request.POST, prefix="access")
        status = 400
        if access.is_valid():
            done = call_service(access, export_update, export=export, **access.cleaned_data)
            if done is not None:
                messages.success(request, f"Access to {export.name} updated; only clients "
                                          "the new policy refuses were disconnected.")
                return redirect("frontend:export", pk=export.pk)
            export = get_object_or_404(export_list(), pk=pk)  # not the refused values
    return render(request, "frontend/export_detail.html", {
        "nav": "exports", "export": export, "access": access, **_connect_context(export),
        **_export_live_context(export),
        "node": _node_state(export.node, node_map([export.node])),
    }, status=status)


def _export_live_context(export: Export) -> dict[str, Any]:
    live = export_live(export.name)
    return {"export": export, "live": live, "engine": node_status(export.node),
            "clients": _client_rows(_active_sessions(export)),
            "refusals": list(refusal_list(export_name=export.name)[:20])}


@page
@require_GET
def export_panel(request: HttpRequest, pk: int) -> HttpResponse:
    """Clients connected now with their features and counters: the partial the export
    page polls."""
    export = get_object_or_404(export_list(), pk=pk)
    return render(request, "frontend/_export_panel.html", _export_live_context(export))


@page
@require_POST
def export_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    export = get_object_or_404(Export, pk=pk)
    enabled = request.POST.get("enabled") == "1"
    export_update(export=export, enabled=enabled)
    messages.success(request, f"Export {export.name} {'enabled' if enabled else 'disabled'}.")
    target = request.POST.get("next") or ""
    if target == "list":
        return redirect("frontend:exports")
    return redirect("frontend:export", pk=export.pk)


# ------------------------------------------------------------------ nodes


def _node_rows() -> list[dict[str, Any]]:
    """Every node with its health, space and what it holds; names that images or exports
    carry but no engine worker registered are listed too (as never seen)."""
    from appliance.storage.models import Image

    now = timezone.now()
    nodes = list(node_list())
    images: dict[str, list[Any]] = {}
    for pk, name, node in Image.objects.order_by("name").values_list("pk", "name", "node"):
        images.setdefault(node, []).append({"pk": pk, "name": name})
    exports: dict[str, list[Any]] = {}
    for pk, name, node in Export.objects.order_by("name").values_list("pk", "name", "node"):
        exports.setdefault(node, []).append({"pk": pk, "name": name})
    rows = []
    for node in nodes:
        capacity, free = node.capacity_bytes, node.free_bytes
        used = max(capacity - free, 0)
        percent = min(100.0, 100.0 * used / capacity) if capacity else 0.0
        up = node_is_up(node, now=now)
        rows.append({
            "node": node, "name": node.name, "registered": True, "up": up,
            "state": "up" if up else "down", "age": node_heartbeat_age(node, now=now),
            "capacity": capacity, "free": free, "used": used, "percent": round(percent, 1),
            "bar_width": f"{percent:.1f}", "labels": node.labels,
            "images": images.get(node.name, []), "exports": exports.get(node.name, []),
        })
    known = {node.name for node in nodes}
    for name in sorted((set(images) | set(exports)) - known):
        rows.append({"node": None, "name": name, "registered": False, "up": False,
                     "state": "unknown", "age": None, "labels": [],
                     "images": images.get(name, []), "exports": exports.get(name, [])})
    return rows


def _nodes_context() -> dict[str, Any]:
    from django.conf import settings

    rows = _node_rows()
    return {"rows": rows, "up_count": sum(1 for r in rows if r["up"]),
            "down_after": settings.APPLIANCE_NODE_DOWN_AFTER}


@page
@require_GET
def nodes(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/nodes.html", {"nav": "nodes", **_nodes_context()})


@page
@require_GET
def nodes_panel(request: HttpRequest) -> HttpResponse:
    """The node table, polled by the Nodes page."""
    return render(request, "frontend/_nodes_panel.html", _nodes_context())


@page
@require_http_methods(["GET", "POST"])
def export_confirm_delete(request: HttpRequest, pk: int) -> HttpResponse:
    export = get_object_or_404(export_list(), pk=pk)
    if request.method == "POST":
        export_delete(export=export)
        messages.success(request, f"Deleted export {export.name}; image "
                                  f"{export.image.name} is kept.")
        return redirect("frontend:exports")
    return render(request, "frontend/confirm_delete.html", {
        "nav": "exports", "kind": "export", "object": export, "cancel": "frontend:export",
        "consequence": "Connected clients are disconnected; the image itself is kept.",
    })


# ------------------------------------------------------------------ feature adoption


@page
@require_GET
def features(request: HttpRequest) -> HttpResponse:
    period = request.GET.get("period") or "24h"
    errors: list[str] = []
    since = until = None
    if period == "custom":
        since = _when(request.GET.get("since"), "since", errors)
        until = _when(request.GET.get("until"), "until", errors)
        if since and until and until <= since:
            errors.append("until must be later than since")
    elif period in PERIODS:
        seconds = PERIODS[period]
        since = timezone.now() - timedelta(seconds=seconds) if seconds else None
    else:
        errors.append(f"unknown period {period!r}")
    stats = session_feature_stats(since=since, until=until) if not errors else None
    chart: dict[str, Any] = {"features": [], "groups": []}
    rows = []
    if stats is not None:
        shown = [f for f in FEATURES if f != "fixed_newstyle"]
        chart["features"] = [{"key": f, "label": FEATURE_LABELS[f]} for f in shown]
        groups = [("all clients", stats["sessions"], stats["features"])]
        labels = dict(Fingerprint.choices)
        for key, group in stats["by_fingerprint"].items():
            groups.append((labels.get(key, key), group["sessions"], group["features"]))
        chart["groups"] = [
            {"label": label, "sessions": n,
             "shares": [(shares[f]["share"] or 0) for f in shown]}
            for label, n, shares in groups
        ]
        for f in shown:
            rows.append({"label": FEATURE_LABELS[f],
                         "cells": [shares[f] for _, _, shares in groups]})
    return render(request, "frontend/features.html", {
        "nav": "features", "period": period, "periods": [*PERIODS, "custom"],
        "since": request.GET.get("since", ""), "until": request.GET.get("until", ""),
        "errors": errors, "stats": stats, "chart": chart, "rows": rows,
        "groups": chart["groups"],
    }, status=400 if errors else 200)


def _when(text: str | None, name: str, errors: list[str]) -> Any:
    if not text:
        return None
    value = parse_datetime(text)
    if value is None:
        errors.append(f"{name}: {text!r} is not a date and time like 2025-01-31T12:00")
        return None
    if timezone.is_naive(value):
        value = timezone.make_aware(value, timezone.get_current_timezone())
    return value


# ------------------------------------------------------------------ security (TLS)


@page
@require_GET
def security(request: HttpRequest) -> HttpResponse:
    return _security_page(request)


def _security_page(request: HttpRequest, *, issue: ClientCertificateForm | None = None,
                   psk: PskIdentityForm | None = None, status: int = 200) -> HttpResponse:
    from django.conf import settings

    from appliance.pki.selectors import client_certificate_list, psk_identity_list, tls_status

    kind = request.GET.get("kind") or ""
    refusals = refusal_list()
    if kind and kind in RefusalKind.values:
        refusals = refusals.filter(kind=kind)
    engine = node_status(settings.APPLIANCE_NODE_NAME)
    return render(request, "frontend/security.html", {
        "nav": "security", "status": tls_status(), "engine": engine,
        "engine_tls": engine.get("tls") or {},
        "engine_tls_error": (engine.get("failed") or {}).get("tls", ""),
        "certificates": list(client_certificate_list()),
        "identities": list(psk_identity_list()),
        "issue": issue or ClientCertificateForm(prefix="issue"),
        "psk": psk or PskIdentityForm(prefix="psk"),
        "refusals": list(refusals[:50]), "kinds": [k for k in RefusalKind.choices if k[0]],
        "kind": kind, "refusal_counts": _refusal_counts(engine.get("refusals") or {}),
    }, status=status)


def _refusal_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    """The engine's refusals since it started, by reason, most frequent first."""
    labels = dict(RefusalKind.choices)
    return sorted(((labels.get(kind, kind), int(n)) for kind, n in counts.items()),
                  key=lambda item: -item[1])


@page
@require_GET
def security_ca(request: HttpRequest) -> HttpResponse:
    """The CA certificate clients trust, as ``ca-cert.pem``."""
    from appliance.pki.services import ca_certificate_pem

    response = HttpResponse(ca_certificate_pem(), content_type="application/x-pem-file")
    response["Content-Disposition"] = 'attachment; filename="ca-cert.pem"'
    return response


@page
@require_POST
def security_rotate(request: HttpRequest) -> HttpResponse:
    from appliance.pki.services import server_certificate_rotate

    server = server_certificate_rotate()
    messages.success(request, f"New server certificate (serial {server.serial}): new "
                              "connections get it; connected clients keep their sessions.")
    return redirect("frontend:security")


@page
@never_cache  # the page holds a private key
@require_POST
def security_issue(request: HttpRequest) -> HttpResponse:
    from appliance.pki.services import ca_certificate_pem, client_certificate_issue

    form = ClientCertificateForm(request.POST, prefix="issue")
    issued = None
    if form.is_valid():
        issued = call_service(form, client_certificate_issue, **form.cleaned_data)
    if issued is None:
        return _security_page(request, issue=form, status=400)
    certificate, cert_pem, key_pem = issued
    example = _example_export(certificate.name)
    return render(request, "frontend/certificate_issued.html", {
        "nav": "security", "certificate": certificate, "directory": client_dir(certificate.name),
        "files": [("ca-cert.pem", ca_certificate_pem()), ("client-cert.pem", cert_pem),
                  ("client-key.pem", key_pem)],
        "example": example,
        "commands": _tls_commands(example, certificate.name) if example is not None else [],
    })


def _example_export(client: str) -> Export | None:
    """An export to show the new client's command lines with: one that lists the client,
    else one that offers TLS, else any."""
    exports = [e for e in export_list() if export_tls_uri(e) is not None]
    for export in exports:
        if client in export.allowed_clients:
            return export
    if exports:
        return exports[0]
    example = export_list().first()
    if example is not None:
        example.tls_policy = TlsPolicy.OPTIONAL  # shown as it would be with TLS (not saved)
    return example


@page
@require_POST
def security_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    from appliance.pki.models import ClientCertificate
    from appliance.pki.services import client_certificate_revoke

    certificate = get_object_or_404(ClientCertificate, pk=pk)
    try:
        client_certificate_revoke(certificate=certificate)
    except ApplianceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Revoked the certificate of {certificate.name} (serial "
                                  f"{certificate.serial}); its connections are closed.")
    return redirect("frontend:security")


@page
@never_cache  # the page holds a secret key
@require_POST
def security_psk_create(request: HttpRequest) -> HttpResponse:
    from appliance.pki.services import psk_identity_create

    form = PskIdentityForm(request.POST, prefix="psk")
    created = None
    if form.is_valid():
        created = call_service(form, psk_identity_create, **form.cleaned_data)
    if created is None:
        return _security_page(request, psk=form, status=400)
    identity, key_hex = created
    example = _example_export(identity.name)
    keys = "$HOME/nbd-tls/psk/keys.psk"  # qemu's tls-creds-psk reads keys.psk in its dir
    commands = []
    if example is not None:
        host, port = export_address(example)
        uri = export_tls_uri(example) or ""
        scheme_host = uri.replace("nbds://", f"nbds://{identity.name}@", 1)
        commands = [
            ("nbdinfo", f'nbdinfo "{scheme_host}?tls-psk-file={keys}"'),
            ("qemu-img", f"qemu-img info --object tls-creds-psk,id=tls0,endpoint=client,"
                         f"dir=$HOME/nbd-tls/psk,username={identity.name} --image-opts "
                         f"driver=raw,file.driver=nbd,file.host={host},file.port={port},"
                         f"file.export={example.name},file.tls-creds=tls0"),
        ]
    return render(request, "frontend/psk_created.html", {
        "nav": "security", "identity": identity, "line": f"{identity.name}:{key_hex}",
        "keys": keys, "example": example, "commands": commands,
    })


@page
@require_POST
def security_psk_delete(request: HttpRequest, pk: int) -> HttpResponse:
    from appliance.pki.models import PskIdentity
    from appliance.pki.services import psk_identity_delete

    identity = get_object_or_404(PskIdentity, pk=pk)
    psk_identity_delete(identity=identity)
    messages.success(request, f"Deleted PSK identity {identity.name}.")
    return redirect("frontend:security")
