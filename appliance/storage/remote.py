"""Storage operations run on the node that holds the image's file.

An image's file lives on one node (``Image.node``). When that node is not this host (or
this host is a ``central`` one, with no storage of its own), the image services do not
touch a file here: they ask the node with ``run_on_node(node, operation, **kwargs)``,
which sends the Celery task ``storage.run`` to the node's own queue ``engine.<node>``
and waits for its answer through the result backend (Redis).

On the node the task runs the same service, inline, against the shared database: the row
and the file change together in one transaction on the host that has the file, exactly as
on a single host. What comes back is plain JSON: ``{"result": ...}`` or
``{"error": {...}}``. An appliance error (``appliance.errors``) is raised again here as
the same class with the same code, status, field and message, so the API answers as if the
service had run locally; a Django ValidationError likewise; anything else becomes
``node_operation_failed`` (502) carrying the node's message. A node that does not answer
within ``APPLIANCE_REMOTE_TIMEOUT`` seconds is ``node_unavailable`` (503), and the task
expires at the same moment, so a node that comes back later never runs an operation the
caller has already reported as failed. A node the Node table already knows to be down is
refused at once, without waiting.

Operations are registered by name with ``@operation("name")``; each receives JSON
arguments and returns JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.http import Http404

from appliance.errors import ApplianceError, NodeOperationFailed, NodeUnavailable

__all__ = [
    "OPERATIONS",
    "error_from_reply",
    "error_to_reply",
    "execute",
    "is_local",
    "operation",
    "run_on_node",
]

log = logging.getLogger(__name__)

OPERATIONS: dict[str, Callable[..., Any]] = {}


def operation(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func`` as the storage operation ``name`` that ``storage.run`` may run."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        OPERATIONS[name] = func
        return func

    return register


def is_local(node: str) -> bool:
    """Whether the file operations of an image on ``node`` run in this process: this host
    is that node and has storage (its role is not ``central``)."""
    return (node == settings.APPLIANCE_NODE_NAME
            and getattr(settings, "APPLIANCE_ROLE", "all") != "central")


def remote_timeout() -> float:
    return float(getattr(settings, "APPLIANCE_REMOTE_TIMEOUT", 120.0))


# ------------------------------------------------------------------ the caller's side


def run_on_node(node: str, operation: str, /, **kwargs: Any) -> Any:
    """Run the storage ``operation`` with JSON ``kwargs`` on ``node`` and return its JSON
    result; errors come back as the exceptions the node raised (see the module doc).
    ``node`` and ``operation`` are positional only, so ``kwargs`` may name a ``node`` too
    (the operations that act on a node's root take it, to check they run on the right one)."""
    if operation not in OPERATIONS:
        raise ValueError(f"unknown storage operation {operation!r}")
    reply = _dispatch(node, operation, kwargs, remote_timeout())
    return _unwrap(node, operation, reply)


def _dispatch(node: str, operation: str, arguments: dict[str, Any],
              timeout: float) -> Any:
    """Send ``storage.run`` to the node's queue and wait for its reply (the seam tests
    replace to run the operation in-process as another node)."""
    from celery.exceptions import TimeoutError as ResultTimeout

    from appliance.engine.tasks import engine_queue

    from .tasks import storage_run

    _refuse_if_known_down(node)
    try:
        result = storage_run.apply_async(args=[operation, arguments],
                                         queue=engine_queue(node), expires=timeout)
    except Exception as exc:  # the broker is away: nobody can reach the node
        raise NodeUnavailable(
            f"cannot ask node {node!r} to {operation}: the message broker is unreachable "
            f"({exc})", field="node") from exc
    try:
        return result.get(timeout=timeout, interval=0.05, disable_sync_subtasks=False)
    except ResultTimeout as exc:
        raise NodeUnavailable(
            f"node {node!r} did not answer within {timeout:g} s ({operation}); is its engine "
            f"worker running? The request expires unanswered, unless the node had already "
            f"started it", field="node") from exc
    except Exception as exc:  # the worker died under the task, the backend went away
        raise NodeOperationFailed(f"{operation} on node {node!r} failed: {exc}") from exc
    finally:
        try:
            result.forget()
        except Exception:
            pass


def _refuse_if_known_down(node: str) -> None:
    from appliance.nodes.models import Node

    row = Node.objects.filter(name=node).first()
    if row is not None and row.status == "down":
        seen = row.last_heartbeat.isoformat(timespec="seconds") if row.last_heartbeat else "never"
        raise NodeUnavailable(
            f"node {node!r} is down (last heartbeat: {seen}); its images cannot be changed "
            f"until its engine worker runs again", field="node")


def _unwrap(node: str, operation: str, reply: Any) -> Any:
    if not isinstance(reply, dict) or not ({"result", "error"} & reply.keys()):
        raise NodeOperationFailed(f"{operation} on node {node!r} answered {reply!r}")
    if reply.get("error") is not None:
        raise error_from_reply(reply["error"], node=node)
    return reply.get("result")


def error_from_reply(error: dict[str, Any], *, node: str) -> Exception:
    """The exception ``error_to_reply`` described, rebuilt on the caller's side."""
    kind = error.get("type")
    detail = str(error.get("detail", ""))
    if kind == "appliance":
        code, status, field = error.get("code"), error.get("status"), error.get("field")
        cls = _appliance_errors().get(str(code))
        exc = (cls or ApplianceError)(detail, field=field)
        if cls is None:
            exc.code = str(code)  # type: ignore[misc]
        if status is not None and exc.status != int(status):
            exc.status = int(status)  # type: ignore[misc]
        return exc
    if kind == "validation":
        return ValidationError(error.get("errors") or detail)
    if kind == "not_found":
        return Http404(detail)
    return NodeOperationFailed(f"on node {node!r}: {detail}")


def _appliance_errors() -> dict[str, type[ApplianceError]]:
    found: dict[str, type[ApplianceError]] = {}
    todo = [ApplianceError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.code, sub)
            todo.append(sub)
    return found


# ------------------------------------------------------------------ the node's side


def execute(operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Run a registered operation here; never raises: ``{"result"}`` or ``{"error"}``.
    (Celery's Django fixup closes stale database connections around each task.)"""
    func = OPERATIONS.get(operation)
    if func is None:
        return {"error": {"type": "internal",
                          "detail": f"node {settings.APPLIANCE_NODE_NAME!r} does not know the "
                                    f"storage operation {operation!r} (an older version?)"}}
    try:
        reply = {"result": func(**arguments)}
    except Exception as exc:
        if not isinstance(exc, ApplianceError | ValidationError | ObjectDoesNotExist):
            log.exception("storage operation %s failed", operation)
        return {"error": error_to_reply(exc)}
    _refresh_usage(operation)
    return reply


def _refresh_usage(operation: str) -> None:
    """The sizes other hosts show for this node's images (``Node.image_usage``) follow an
    operation at once rather than at the next heartbeat; a failure here only delays them."""
    from appliance.nodes.services import node_usage_refresh

    try:
        node_usage_refresh()
    except Exception as exc:
        log.warning("image sizes not refreshed after %s: %s", operation, exc)


def error_to_reply(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApplianceError):
        return {"type": "appliance", "code": exc.code, "status": exc.status,
                "field": exc.field, "detail": exc.message}
    if isinstance(exc, ValidationError):
        errors = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        return {"type": "validation", "errors": errors}
    if isinstance(exc, ObjectDoesNotExist):
        return {"type": "not_found", "detail": str(exc) or "no such object"}
    return {"type": "internal", "detail": f"{type(exc).__name__}: {exc}"}


def _here(node: str) -> None:
    """A misrouted task must not act on another node's image with this node's root."""
    if not is_local(node):
        raise NodeOperationFailed(
            f"this is node {settings.APPLIANCE_NODE_NAME!r} (role "
            f"{getattr(settings, 'APPLIANCE_ROLE', 'all')}), asked to act on an image of "
            f"node {node!r}")


def _image(pk: int) -> Any:
    from .models import Image

    image = Image.objects.get(pk=pk)
    _here(image.node)
    return image


@operation("create")
def _op_create(*, node: str, name: str, size: int, description: str = "") -> dict[str, Any]:
    from . import services

    _here(node)
    image = services.image_create_here(name=name, size=size, description=description,
                                       node=node)
    return {"id": image.pk}


@operation("grow")
def _op_grow(*, image: int, size: int, force: bool = False) -> dict[str, Any]:
    from . import services

    grown = services.image_grow(image=_image(image), size=size, force=force)
    return {"id": grown.pk, "size": grown.size}


@operation("check_grow")
def _op_check_grow(*, image: int, size: int, force: bool = False) -> int:
    from . import services

    return services.image_check_grow(image=_image(image), size=size, force=force)


@operation("check_free_space")
def _op_check_free_space(*, node: str, needed: int, action: str) -> None:
    from . import services

    _here(node)
    services._check_free_space(needed=needed, action=action)


@operation("delete")
def _op_delete(*, image: int) -> None:
    from . import services

    services.image_delete(image=_image(image))


@operation("delete_file")
def _op_delete_file(*, node: str, filename: str) -> bool:
    """Remove a file the appliance named from this node's storage root (no row involved:
    for a copy left behind, e.g. after a move). True when there was a file."""
    from . import services

    _here(node)
    if not services._FILENAME.fullmatch(filename):
        raise ValueError(f"{filename!r} is not a name the appliance gives image files")
    path = services.storage_root() / filename
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


@operation("clone")
def _op_clone(*, source: int, name: str, description: str = "") -> dict[str, Any]:
    from . import services

    clone = services.image_clone(source=_image(source), name=name, description=description)
    return {"id": clone.pk}


@operation("usage")
def _op_usage(*, node: str, images: list[int]) -> dict[str, Any]:
    """Virtual and allocated sizes of these images' files, and the root's free bytes."""
    from .models import Image
    from .selectors import image_usage
    from .services import _free_bytes, storage_root

    _here(node)
    sizes = {}
    for image in Image.objects.filter(pk__in=images, node=node):
        usage = image_usage(image)
        sizes[str(image.pk)] = [usage.virtual_size, usage.allocated_size]
    return {"images": sizes, "free": _free_bytes(storage_root())}
