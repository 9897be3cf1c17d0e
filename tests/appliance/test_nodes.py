"""Nodes: registration and heartbeats of this host, status from the heartbeat's age, and
placement of new images (free space, labels, a named node)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from appliance_testing import GiB, MiB, place_on
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import call_command
from django.utils import timezone

from appliance.config import env_labels
from appliance.errors import NodeUnavailable, NoNodeAvailable
from appliance.exports.services import export_publish
from appliance.nodes.models import Node
from appliance.nodes.selectors import node_is_up, node_list, nodes_available, nodes_up
from appliance.nodes.services import node_choose, node_heartbeat, node_register
from appliance.storage.services import (
    image_clone,
    image_create,
    image_create_from_upload,
    image_path,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def local(settings, storage_root):
    settings.NBD_PUBLIC_HOST = "nbd1.example.net"
    settings.NBD_PORT = 10810
    settings.APPLIANCE_NODE_LABELS = ["ssd", "rack=a2"]
    return settings


# ------------------------------------------------------------------ register and heartbeat


def test_register_records_this_host(local, storage_root) -> None:
    node = node_register()
    stored = Node.objects.get(name="node1")
    assert stored.pk == node.pk
    assert (stored.nbd_host, stored.nbd_port, stored.address) == (
        "nbd1.example.net", 10810, "nbd1.example.net:10810")
    assert stored.storage_root == str(storage_root.resolve())
    st = os.statvfs(storage_root)
    assert stored.capacity_bytes == st.f_blocks * st.f_frsize
    assert 0 < stored.free_bytes <= stored.capacity_bytes
    assert stored.labels == ["ssd", "rack=a2"]
    assert stored.version
    assert stored.started_at == stored.last_heartbeat
    assert stored.status == "up"


def test_register_again_keeps_one_row_and_restarts_it(local) -> None:
    earlier = timezone.now() - timedelta(hours=1)
    node_register(now=earlier)
    local.NBD_PORT = 10811
    node_register()
    node = Node.objects.get()
    assert node.nbd_port == 10811
    assert node.started_at > earlier


def test_the_address_falls_back_to_the_bind_address(settings, storage_root) -> None:
    settings.NBD_PUBLIC_HOST = ""
    settings.NBD_BIND = "::1"
    node = node_register()
    assert node.address == "[::1]:10809"


def test_heartbeat_refreshes_time_and_space_not_the_start(local) -> None:
    started = timezone.now() - timedelta(seconds=60)
    node_register(now=started)
    Node.objects.update(free_bytes=0, capacity_bytes=0)
    assert not node_is_up(Node.objects.get())  # 60 s without a beat
    node_heartbeat()
    node = Node.objects.get()
    assert node.started_at == started
    assert node.last_heartbeat > started
    assert node.free_bytes > 0
    assert node.capacity_bytes > 0
    assert node.status == "up"


def test_heartbeat_registers_a_row_that_vanished(local) -> None:
    node_heartbeat()
    assert Node.objects.get().nbd_host == "nbd1.example.net"


def test_a_bad_node_name_is_not_registered(settings, storage_root) -> None:
    settings.APPLIANCE_NODE_NAME = "bad host!"
    with pytest.raises(ValidationError, match="APPLIANCE_NODE_NAME"):
        node_register()
    assert not Node.objects.exists()


# ------------------------------------------------------------------ status from time


def test_status_is_up_within_the_down_after_window(settings, make_node) -> None:
    settings.APPLIANCE_NODE_DOWN_AFTER = 15
    fresh, late, gone = make_node("a", age=1), make_node("b", age=14), make_node("c", age=16)
    assert [n.status for n in (fresh, late, gone)] == ["up", "up", "down"]
    assert [n.name for n in nodes_up()] == ["a", "b"]
    later = timezone.now() + timedelta(seconds=10)  # nobody beats for 10 s more
    assert [node_is_up(n, now=later) for n in (fresh, late, gone)] == [True, False, False]
    assert list(nodes_up(now=later)) == [fresh]
    settings.APPLIANCE_NODE_DOWN_AFTER = 0.5
    assert Node.objects.get(name="a").status == "down"


def test_availability_by_name(make_node) -> None:
    make_node("a")
    make_node("b", age=3600)
    assert nodes_available(["a", "b", "never-seen"]) == {"a": True, "b": False,
                                                          "never-seen": False}


def test_node_list_counts_images_and_exports(make_node, make_image) -> None:
    make_node("node1")
    make_node("node2")
    one, two = make_image("one"), make_image("two")
    export_publish(image=one, name="e1")
    export_publish(image=one, name="e2")
    export_publish(image=place_on(two, "node2"), name="e3")
    make_image("three")
    counts = {n.name: (n.images_count, n.exports_count) for n in node_list()}
    assert counts == {"node1": (2, 2), "node2": (1, 1)}


# ------------------------------------------------------------------ placement


def test_the_node_with_the_most_free_space_is_chosen(make_node) -> None:
    make_node("small", free=10 * GiB)
    make_node("big", free=500 * GiB)
    make_node("middle", free=100 * GiB)
    assert node_choose(size=GiB) == "big"


def test_ties_go_to_the_first_name(make_node) -> None:
    make_node("b", free=GiB)
    make_node("a", free=GiB)
    assert node_choose(size=GiB) == "a"


def test_down_nodes_are_never_chosen(make_node) -> None:
    make_node("roomy-but-down", free=900 * GiB, age=3600)
    make_node("up", free=GiB)
    assert node_choose(size=GiB) == "up"


def test_labels_narrow_the_choice(make_node) -> None:
    make_node("hdd", free=900 * GiB, labels=["hdd", "rack=a2"])
    make_node("ssd-small", free=10 * GiB, labels=["ssd", "rack=a1"])
    make_node("ssd-big", free=50 * GiB, labels=["ssd", "rack=a2"])
    assert node_choose(size=GiB) == "hdd"
    assert node_choose(size=GiB, labels=["ssd"]) == "ssd-big"
    assert node_choose(size=GiB, labels=["ssd", "rack=a1"]) == "ssd-small"
    assert node_choose(size=GiB, labels=[" ssd ", "ssd"]) == "ssd-big"
    with pytest.raises(NoNodeAvailable) as caught:
        node_choose(size=GiB, labels=["nvme"])
    assert caught.value.status == 409
    assert caught.value.code == "no_node_available"
    assert "no node that is up has the labels nvme" in caught.value.message
    assert "ssd-big [ssd, rack=a2]" in caught.value.message


def test_bad_labels_are_refused(make_node) -> None:
    make_node("a")
    with pytest.raises(ValidationError) as caught:
        node_choose(size=GiB, labels=["no spaces"])
    assert "labels" in caught.value.message_dict


def test_no_node_up_is_a_conflict_naming_them(make_node) -> None:
    make_node("a", age=100)
    with pytest.raises(NoNodeAvailable, match=r"no node is up .*a last seen 10\d s ago"):
        node_choose(size=GiB)


def test_a_node_must_keep_its_reserve(settings, make_node) -> None:
    settings.APPLIANCE_STORAGE_RESERVE = 2 * GiB
    make_node("full", free=GiB)
    with pytest.raises(NoNodeAvailable, match="full has 1 GiB free, and 2 GiB is kept"):
        node_choose(size=10 * GiB)
    make_node("roomy", free=3 * GiB)
    assert node_choose(size=10 * GiB) == "roomy"  # sparse: the size is not taken up front


def test_a_named_node_must_be_up(make_node) -> None:
    make_node("a", free=GiB, labels=["ssd"])
    make_node("b", free=900 * GiB)
    make_node("down", age=3600)
    assert node_choose(size=GiB, node="a") == "a"
    assert node_choose(size=GiB, node="a", labels=["ssd"]) == "a"
    for name, fragment in [("down", "node 'down' is down: its last heartbeat was 3600 s ago"),
                           ("nowhere", "there is no node named 'nowhere'; known nodes: a (up)"),
                           ("b", "lacks the labels ssd")]:
        with pytest.raises(NodeUnavailable) as caught:
            node_choose(size=GiB, node=name, labels=["ssd"] if name == "b" else ())
        error = caught.value
        assert (error.code, error.status, error.field) == ("node_unavailable", 400, "node")
        assert fragment in error.message


def test_an_empty_table_means_this_host(settings) -> None:
    """A single host whose engine worker never ran has registered nothing yet."""
    assert node_choose(size=GiB) == "node1"
    assert node_choose(size=GiB, node="node1") == "node1"
    with pytest.raises(NodeUnavailable):
        node_choose(size=GiB, node="node2")
    settings.APPLIANCE_ROLE = "central"  # no storage here: nowhere to put it
    with pytest.raises(NoNodeAvailable, match="no storage node has registered"):
        node_choose(size=GiB)


# ------------------------------------------------------------------ images and exports


def test_images_are_placed_and_clones_stay_with_their_source(settings, make_node) -> None:
    make_node("node1", free=10 * GiB)
    make_node("node2", free=20 * GiB, labels=["ssd"])
    # This host is node2 here, so that the file operations run in this process whatever
    # node the test places the image on.
    settings.APPLIANCE_NODE_NAME = "node2"
    image = image_create(name="disk", size=64 * MiB)
    assert image.node == "node2"
    assert image_path(image).stat().st_size == 64 * MiB
    labelled = image_create(name="fast", size=64 * MiB, labels=["ssd"])
    assert labelled.node == "node2"
    clone = image_clone(source=image, name="copy")
    assert clone.node == "node2"
    with pytest.raises(NodeUnavailable):
        image_create(name="x", size=64 * MiB, node="node1", labels=["ssd"])
    export = export_publish(image=image, name="vm1")
    assert export.node == "node2"


def test_an_upload_is_placed_before_its_body_is_read(settings, make_node) -> None:
    class Body:
        read_calls = 0

        def read(self, size: int = -1) -> bytes:
            Body.read_calls += 1
            return bytes(size)

    make_node("node1", age=3600)
    with pytest.raises(NoNodeAvailable):
        image_create_from_upload(name="up", stream=Body(), length=MiB)
    assert Body.read_calls == 0
    make_node("node1")
    image = image_create_from_upload(name="up", stream=Body(), length=MiB, node="node1")
    assert image.node == "node1"
    assert image_path(image).stat().st_size == MiB


# ------------------------------------------------------------------ settings and bootstrap


def test_env_labels(monkeypatch) -> None:
    monkeypatch.setenv("LABELS", " ssd, rack=a2 ,ssd,, zone/eu-1")
    assert env_labels("LABELS") == ["ssd", "rack=a2", "zone/eu-1"]
    monkeypatch.setenv("LABELS", "")
    assert env_labels("LABELS") == []
    monkeypatch.setenv("LABELS", "ssd,two words")
    with pytest.raises(ImproperlyConfigured, match="'two words'"):
        env_labels("LABELS")


@pytest.mark.parametrize(
    ("env", "message"),
    [({"APPLIANCE_ROLE": "storage"}, "APPLIANCE_ROLE must be one of all, central, node"),
     ({"APPLIANCE_NODE_DOWN_AFTER": "soon"}, "APPLIANCE_NODE_DOWN_AFTER must be a number"),
     ({"APPLIANCE_NODE_LABELS": "a b"}, "APPLIANCE_NODE_LABELS lists labels")],
)
def test_settings_refuse_bad_node_settings(env: dict[str, str], message: str) -> None:
    out = subprocess.run([sys.executable, "-c", "import django; django.setup()"],
                         capture_output=True, text=True,
                         env={**os.environ, **env, "DJANGO_SETTINGS_MODULE": "appliance.settings"},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode != 0
    assert f"ImproperlyConfigured: {message}" in out.stderr


def test_node_settings_defaults() -> None:
    probe = ("import django; django.setup(); from django.conf import settings as s; "
             "print(s.APPLIANCE_ROLE, s.APPLIANCE_NODE_DOWN_AFTER, s.APPLIANCE_NODE_LABELS)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("APPLIANCE_ROLE", "APPLIANCE_NODE_DOWN_AFTER", "APPLIANCE_NODE_LABELS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**env, "DJANGO_SETTINGS_MODULE": "appliance.settings"},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["all", "15.0", "[]"]


@pytest.mark.parametrize(("role", "registered"), [("all", True), ("node", True),
                                                  ("central", False)])
def test_bootstrap_registers_this_node_unless_central(settings, role, registered) -> None:
    settings.APPLIANCE_ROLE = role
    call_command("appliance_bootstrap", "--no-demo", stdout=StringIO())
    assert Node.objects.filter(name="node1").exists() is registered


def test_bootstrap_demo_is_on_this_node(settings) -> None:
    out = StringIO()
    call_command("appliance_bootstrap", stdout=out)
    assert '"node": "node1"' in out.getvalue()
    from appliance.exports.models import Export

    demo = Export.objects.get(name="demo")
    assert (demo.node, demo.image.node) == ("node1", "node1")


# ------------------------------------------------------------------ the worker's heartbeat


def test_the_worker_heartbeat_registers_then_beats_and_survives_failures(caplog) -> None:
    from appliance.engine.supervisor import NodeHeartbeat

    calls: list[str] = []
    enough = threading.Event()
    failures = iter([True, False, True, False, False])

    def register() -> None:
        calls.append("register")
        if next(failures):
            raise ConnectionError("database away")

    def beat() -> None:
        calls.append("beat")
        if next(failures, False):
            raise ConnectionError("database away")
        if calls.count("beat") >= 3:
            enough.set()

    hb = NodeHeartbeat(every_s=0.01, register=register, beat=beat)
    hb.start(wait_s=5)
    assert calls[0] == "register"  # before start() returned (the engine starts after)
    assert enough.wait(10)
    hb.stop()
    # a failed registration is tried again; a failed beat does not stop the beating
    assert calls[:4] == ["register", "register", "beat", "beat"]
    assert hb.registered
    assert hb.failures == 2
    assert "node registration failed (ConnectionError: database away)" in caplog.text
    assert "node heartbeat failed" in caplog.text


@pytest.mark.django_db(transaction=True)  # the thread's connection must see the rows
def test_the_worker_heartbeat_keeps_the_node_up(local) -> None:
    """The real services, through the thread: the row appears and its beat moves."""
    from appliance.engine.supervisor import NodeHeartbeat

    hb = NodeHeartbeat(every_s=0.05)
    hb.start(wait_s=10)
    try:
        first = Node.objects.get(name="node1").last_heartbeat
        deadline = timezone.now() + timedelta(seconds=10)
        while Node.objects.get(name="node1").last_heartbeat == first:
            assert timezone.now() < deadline
            threading.Event().wait(0.02)
    finally:
        hb.stop()
    assert hb.registered
    assert hb.failures == 0
