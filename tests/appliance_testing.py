"""Fixtures and helpers of tests/appliance and tests/api (a plugin of tests/conftest.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import file_extents

DATA = Path(__file__).parent / "appliance" / "data"
MiB = 1 << 20
GiB = 1 << 30


APPLIANCE_TESTS = (Path(__file__).parent / "appliance", Path(__file__).parent / "api")


@pytest.fixture(autouse=True)
def _appliance_settings(request: pytest.FixtureRequest) -> None:
    """Every appliance or API test gets its own storage root (the engine's tests are left
    alone: they never touch Django)."""
    if Path(request.node.path).parent in APPLIANCE_TESTS:
        request.getfixturevalue("storage_root")


@pytest.fixture
def storage_root(settings: Any, tmp_path: Path) -> Path:
    """A storage root of the test's own, no free-space reserve and the default quota."""
    root = tmp_path / "images"
    settings.STORAGE_ROOT = root
    settings.APPLIANCE_STORAGE_RESERVE = 0
    settings.APPLIANCE_PROVISION_QUOTA = 64 << 40
    settings.APPLIANCE_IMAGE_MIN_SIZE = MiB
    settings.APPLIANCE_IMAGE_MAX_SIZE = 16 << 40
    settings.APPLIANCE_NODE_NAME = "node1"
    settings.APPLIANCE_TLS_DIR = tmp_path / "tls"  # the engine's TLS files (appliance.pki)
    return root


@pytest.fixture
def user(db: None) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_user("alice", password="correct horse battery")


@pytest.fixture
def api(user: Any) -> Any:
    """An APIClient authenticated with alice's token."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def web(client: Any, user: Any) -> Any:
    """Django's test client, logged in to the dashboard."""
    client.force_login(user)
    return client


@pytest.fixture
def anon(db: None) -> Any:
    from rest_framework.test import APIClient

    return APIClient()


def client_records() -> dict[str, list[dict[str, Any]]]:
    """Negotiation records of real clients (see data/client_records.json)."""
    return json.loads((DATA / "client_records.json").read_text())["records"]


def engine_snapshot(
    negotiated: dict[str, Any] | None = None,
    *,
    connection_id: int = 1,
    peer: str = "192.0.2.10:40000",
    opened_at: float | None = None,
    closed_at: float | None = None,
    close_reason: str = "",
    ops: dict[str, int] | None = None,
    **stats: Any,
) -> dict[str, Any]:
    """A ``ConnectionInfo.snapshot()`` made by nbdcore itself, with the given record."""
    from nbdcore.protocol.constants import Cmd
    from nbdcore.protocol.handshake import NegotiationRecord, OptionSeen
    from nbdcore.stats import ConnectionInfo

    info = ConnectionInfo(peer=peer, id=connection_id)
    info.opened_at = time.time() if opened_at is None else opened_at
    info.closed_at = closed_at
    info.close_reason = close_reason
    if negotiated is not None:
        fields = dict(negotiated)
        options = [OptionSeen(**o) for o in fields.pop("options", [])]
        if fields.get("block_size") is not None:
            fields["block_size"] = tuple(fields["block_size"])
        info.record = NegotiationRecord(options=options, **fields)
    for name, count in (ops or {}).items():
        info.stats.ops[Cmd[name]] = count
    for name, value in stats.items():
        setattr(info.stats, name, value)
    return info.snapshot()


@pytest.fixture
def make_image(db: None) -> Callable[..., Any]:
    from appliance.storage.services import image_create

    def factory(name: str = "disk", size: int = 64 * MiB, **kwargs: Any) -> Any:
        return image_create(name=name, size=size, **kwargs)

    return factory


def place_on(image: Any, node: str) -> Any:
    """Record ``image`` as held by ``node`` (the database only: its file stays where it
    is), for tests about images and exports of other nodes."""
    from appliance.storage.models import Image

    Image.objects.filter(pk=image.pk).update(node=node)
    image.node = node
    return image


@pytest.fixture
def make_export(make_image: Callable[..., Any]) -> Callable[..., Any]:
    """``make_export(name, image=None, node=None, **fields)``: an export of a new (or the
    given) image; with ``node``, the image is recorded on that node first (an export is
    served by its image's node)."""
    from appliance.exports.services import export_publish

    def factory(name: str = "vm1", image: Any = None, node: str | None = None,
                **kwargs: Any) -> Any:
        if image is None:
            image = make_image(name=f"{name}-disk")
        if node is not None and image.node != node:
            place_on(image, node)
        return export_publish(image=image, name=name, **kwargs)

    return factory


def allocated(path: Path) -> int:
    """Bytes the file really occupies (st_blocks * 512)."""
    return path.stat().st_blocks * 512


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the file's data extents, from SEEK_DATA/SEEK_HOLE."""
    return [(offset, length) for offset, length, is_data in file_extents(path) if is_data]


@pytest.fixture
def make_node(db: None) -> Callable[..., Any]:
    """``make_node(name, free=..., labels=..., age=0)``: a registered node whose last
    heartbeat was ``age`` seconds ago (no clock waits: status comes from the timestamp)."""
    from datetime import timedelta

    from django.utils import timezone

    from appliance.nodes.models import Node

    def factory(name: str = "node1", *, free: int = 100 * GiB, capacity: int = 200 * GiB,
                labels: tuple[str, ...] | list[str] = (), age: float = 0.0,
                nbd_host: str = "127.0.0.1", nbd_port: int = 10809) -> Any:
        beat = timezone.now() - timedelta(seconds=age)
        node, _ = Node.objects.update_or_create(name=name, defaults={
            "nbd_host": nbd_host, "nbd_port": nbd_port, "storage_root": f"/srv/{name}",
            "capacity_bytes": capacity, "free_bytes": free, "labels": list(labels),
            "version": "test", "started_at": beat, "last_heartbeat": beat,
        })
        return node

    return factory


# ---------------------------------------------------------------- several nodes in one process

CLUSTER_NODES = ("node-a", "node-b")


def add_node(name: str, *, age_s: float = 0.0, host: str = "127.0.0.9",
             port: int = 10809) -> Any:
    from datetime import timedelta

    from django.utils import timezone

    from appliance.nodes.models import Node

    now = timezone.now()
    return Node.objects.update_or_create(name=name, defaults={
        "nbd_host": host, "nbd_port": port, "storage_root": f"/srv/{name}",
        "capacity_bytes": 1 << 40, "free_bytes": 1 << 39, "started_at": now,
        "last_heartbeat": now - timedelta(seconds=age_s)})[0]


class Cluster:
    """This process plays a central host; each storage operation sent to a node runs
    in-process as that node (its name, role and storage root), its arguments and answer
    passed through JSON as Celery would."""

    def __init__(self, tmp: Path) -> None:
        self.roots = {name: tmp / name for name in CLUSTER_NODES}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def files(self, node: str) -> set[str]:
        root = self.roots[node]
        return {p.name for p in root.iterdir()} if root.exists() else set()

    def as_node(self, node: str) -> Any:
        from django.test import override_settings

        return override_settings(APPLIANCE_NODE_NAME=node, APPLIANCE_ROLE="node",
                                 STORAGE_ROOT=self.roots[node])

    def dispatch(self, node: str, operation: str, arguments: dict[str, Any],
                 timeout: float) -> Any:
        from appliance.storage import remote

        arguments = json.loads(json.dumps(arguments))
        self.calls.append((node, operation, arguments))
        with self.as_node(node):
            reply = remote.execute(operation, arguments)
        return json.loads(json.dumps(reply))


@pytest.fixture
def cluster(settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            db: None) -> Cluster:
    from appliance.storage import remote

    settings.APPLIANCE_NODE_NAME = "central"
    settings.APPLIANCE_ROLE = "central"
    settings.STORAGE_ROOT = tmp_path / "central"
    monkeypatch.setattr("appliance.engine.tasks.request_sync", lambda node: None)
    running = Cluster(tmp_path)
    monkeypatch.setattr(remote, "_dispatch", running.dispatch)
    for name in CLUSTER_NODES:
        add_node(name)
    return running
