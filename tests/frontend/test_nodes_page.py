"""The dashboard's Nodes page, the node shown on image and export pages, exports of a down
node shown unavailable, and placement from the image forms."""

from __future__ import annotations

import re

import pytest
from appliance_testing import GiB, MiB, place_on
from django.core.files.uploadedfile import SimpleUploadedFile

from appliance.storage.models import Image

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _storage(storage_root):
    return storage_root


def row(html: str, attribute: str, name: str) -> str:
    match = re.search(rf'<tr[^>]*{attribute}="{re.escape(name)}"[^>]*>(.*?)</tr>', html, re.S)
    assert match, f"no row {attribute}={name}"
    return match.group(0)


def test_the_nav_links_to_the_nodes_page(web) -> None:
    html = web.get("/").content.decode()
    assert '<a href="/nodes/"' in html


def test_nodes_page_shows_health_space_labels_and_contents(web, settings, make_node,
                                                          make_image, make_export) -> None:
    settings.APPLIANCE_NODE_DOWN_AFTER = 15
    make_node("node1", free=30 * GiB, capacity=40 * GiB, labels=["ssd", "rack=a2"],
              nbd_host="192.0.2.1", age=2)
    make_node("node2", age=125, nbd_port=10900)
    make_export("vm1")
    make_export("vm2", node="node2")
    make_image("spare")
    place_on(make_image("orphan"), "node9")  # a node no engine worker registered
    response = web.get("/nodes/")
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-poll="/nodes/panel"' in html
    assert "2 of 3 up" not in html
    assert "1 of 3 up" in html
    one = row(html, "data-node", "node1")
    assert 'data-state="up"' in one
    assert "heartbeat 2 s ago" in one
    assert "<code>192.0.2.1:10809</code>" in one
    assert "30 GiB</span> free of 40 GiB" in one
    assert "10 GiB used of 40 GiB (25.0%)" in one
    assert '<span class="badge label">ssd</span>' in one
    assert ">vm1-disk</a>" in one
    assert ">spare</a>" in one
    assert ">vm1</a>" in one
    assert ">vm2</a>" not in one
    two = row(html, "data-node", "node2")
    assert 'data-state="down"' in two
    assert "heartbeat 2 min ago" in two
    assert ":10900</code>" in two
    assert ">vm2</a>" in two
    nine = row(html, "data-node", "node9")
    assert "never registered" in nine
    assert ">orphan</a>" in nine
    panel = web.get("/nodes/panel")
    assert panel.status_code == 200
    assert 'id="node-list"' in panel.content.decode()


def test_nodes_page_without_nodes(web) -> None:
    html = web.get("/nodes/").content.decode()
    assert "No node has registered yet" in html


def test_images_show_their_node(web, make_node, make_image) -> None:
    make_node("node1")
    make_node("node2", age=3600)
    image = make_image("disk")
    place_on(make_image("far"), "node2")
    html = web.get("/images/").content.decode()
    assert 'data-node="node1" data-state="up"' in row(html, "data-image", "disk")
    assert "node2 (down)" in row(html, "data-image", "far")
    detail = web.get(f"/images/{image.pk}/").content.decode()
    assert re.search(r'id="image-node">.*data-node="node1"', detail)


def test_a_central_host_shows_sizes_and_free_space_from_the_nodes(
        web, settings, make_node, make_image) -> None:
    from appliance.nodes.models import Node

    image = place_on(make_image("far"), "node2")
    make_node("node1", free=2 * GiB)
    make_node("node2", free=4 * GiB)
    Node.objects.filter(name="node2").update(image_usage={str(image.pk): [64 * MiB, 16 * MiB]})
    settings.APPLIANCE_ROLE = "central"
    html = web.get("/images/").content.decode()
    assert "16 MiB allocated of 64 MiB virtual (25.0%)" in row(html, "data-image", "far")
    assert "6 GiB free on 2 nodes" in html
    detail = web.get(f"/images/{image.pk}/").content.decode()
    assert "16 MiB allocated of 64 MiB virtual (25.0%)" in detail
    assert "6 GiB free on 2 nodes" in web.get("/").content.decode()


def test_an_export_on_a_down_node_is_shown_unavailable(web, make_node, make_export) -> None:
    make_node("node1", nbd_host="192.0.2.1")
    make_node("node2", age=3600, nbd_host="192.0.2.2", nbd_port=10900)
    make_export("ok")
    gone = make_export("gone", node="node2")
    html = web.get("/exports/").content.decode()
    assert "unavailable" not in row(html, "data-export", "ok")
    assert "nbd://192.0.2.1/ok" in row(html, "data-export", "ok")
    down = row(html, "data-export", "gone")
    assert 'class="badge off unavailable">unavailable' in down
    assert "nbd://192.0.2.2:10900/gone" in down
    detail = web.get(f"/exports/{gone.pk}/").content.decode()
    assert 'id="export-unavailable"' in detail
    assert "node node2 is down" in detail
    assert "nbd://192.0.2.2:10900/gone" in detail
    assert "qemu-img info nbd://192.0.2.2:10900/gone" in detail


def test_an_export_on_a_never_registered_node(web, make_export) -> None:
    export = make_export("vm1")
    detail = web.get(f"/exports/{export.pk}/").content.decode()
    assert "has never registered" in detail


def test_the_create_form_offers_the_up_nodes(web, make_node) -> None:
    make_node("node1", free=30 * GiB, labels=["ssd"])
    make_node("node2", age=3600)
    html = web.get("/images/").content.decode()
    select = re.search(r'<select name="create-node"[^>]*>(.*?)</select>', html, re.S)
    assert select, html
    options = re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select.group(1))
    assert options == [("", "automatic (most free space)"), ("node1", "node1: 30 GiB free [ssd]")]
    assert 'name="create-labels"' in html
    assert 'name="import-node"' in html


def test_create_an_image_on_a_chosen_node(web, settings, make_node) -> None:
    make_node("node1", free=900 * GiB)
    make_node("node2", free=GiB, labels=["ssd"])
    settings.APPLIANCE_NODE_NAME = "node2"  # the file operations stay in this process
    response = web.post("/images/", {"create-name": "disk1", "create-size": "64M",
                                     "create-node": "node2"})
    assert response.status_code == 302
    assert Image.objects.get(name="disk1").node == "node2"
    labelled = web.post("/images/", {"create-name": "disk2", "create-size": "64M",
                                     "create-labels": "ssd"})
    assert labelled.status_code == 302
    assert Image.objects.get(name="disk2").node == "node2"
    page = web.get("/images/").content.decode()
    assert "Created image disk2 (64 MiB) on node2." in page


def test_placement_refusals_are_shown_beside_the_fields(web, make_node) -> None:
    make_node("node1")
    make_node("node2", age=3600)
    down = web.post("/images/", {"create-name": "disk1", "create-size": "64M",
                                 "create-node": "node2"})
    assert down.status_code == 400
    html = down.content.decode()
    assert re.search(r'id="id_create-node-errors"><li>node &#x27;node2&#x27; is down', html)
    none = web.post("/images/", {"create-name": "disk1", "create-size": "64M",
                                 "create-labels": "nvme"})
    assert none.status_code == 400
    assert "no node that is up has the labels nvme" in none.content.decode()
    bad = web.post("/images/", {"create-name": "disk1", "create-size": "64M",
                                "create-labels": "a*b"})
    assert bad.status_code == 400
    assert 'id="id_create-labels-errors"' in bad.content.decode()
    assert not Image.objects.exists()


def test_import_on_a_chosen_node(web, settings, make_node) -> None:
    make_node("node1", free=900 * GiB)
    make_node("node2", free=GiB)
    settings.APPLIANCE_NODE_NAME = "node2"
    upload = SimpleUploadedFile("disk.raw", bytes(MiB), content_type="application/octet-stream")
    response = web.post("/images/", {"import-name": "imported", "import-file": upload,
                                     "import-node": "node2"})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Image.objects.get(name="imported").node == "node2"


@pytest.mark.django_db(transaction=True)
def test_the_image_page_starts_a_move_to_an_up_node(web, make_image, make_node, settings,
                                                   storage_root, monkeypatch) -> None:
    from appliance.storage import move

    queued: list[int] = []
    monkeypatch.setattr(move.storage_move, "delay", queued.append)
    monkeypatch.setattr("appliance.engine.tasks.request_sync", lambda node: None)
    make_node(settings.APPLIANCE_NODE_NAME)
    make_node("node-b", free=1 << 40)
    make_node("node-c", age=600)  # down: not offered
    image = make_image("traveller", size=16 << 20, node=settings.APPLIANCE_NODE_NAME)
    page = web.get(f"/images/{image.pk}/").content.decode()
    assert 'id="move-image"' in page
    assert 'value="node-b"' in page
    assert 'value="node-c"' not in page
    response = web.post(f"/images/{image.pk}/", {"move-node": "node-b"})
    assert response.status_code == 302
    image.refresh_from_db()
    assert image.moving_to == "node-b"
    assert queued == [image.pk]
    page = web.get(f"/images/{image.pk}/").content.decode()
    assert 'id="image-moving"' in page
