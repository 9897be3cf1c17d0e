"""/api/v1/nodes/ and the nodes in images and exports: placement requests, read-only node
fields, exports' availability and URIs naming their node's address."""

from __future__ import annotations

import pytest
from appliance_testing import GiB, MiB, place_on

from appliance.storage.models import Image

pytestmark = pytest.mark.django_db


def test_nodes_need_a_login(anon) -> None:
    assert anon.get("/api/v1/nodes/").status_code == 401


def test_list_and_detail_by_name(api, make_node, make_image, make_export) -> None:
    make_node("node1", free=10 * GiB, capacity=20 * GiB, labels=["ssd"], nbd_port=10810)
    make_node("nbd-2.example.net", age=3600, nbd_host="2001:db8::2")
    make_export("vm1")
    make_image("spare")
    listed = api.get("/api/v1/nodes/")
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == 2
    one, two = body["results"]
    assert one["name"] == "nbd-2.example.net"
    assert (one["status"], one["images_count"], one["exports_count"]) == ("down", 0, 0)
    assert one["address"] == "[2001:db8::2]:10809"
    assert one["heartbeat_age"] >= 3600
    assert two["name"] == "node1"
    assert two["status"] == "up"
    assert (two["capacity_bytes"], two["free_bytes"]) == (20 * GiB, 10 * GiB)
    assert (two["labels"], two["images_count"], two["exports_count"]) == (["ssd"], 2, 1)
    assert (two["nbd_host"], two["nbd_port"], two["address"]) == (
        "127.0.0.1", 10810, "127.0.0.1:10810")
    assert {"last_heartbeat", "started_at", "version", "storage_root"} <= set(two)
    detail = api.get("/api/v1/nodes/nbd-2.example.net/")
    assert detail.status_code == 200
    assert detail.json()["name"] == "nbd-2.example.net"
    assert api.get("/api/v1/nodes/node1").json()["status"] == "up"  # no trailing slash
    assert api.get("/api/v1/nodes/nowhere/").status_code == 404


def test_status_follows_the_heartbeat_age(api, settings, make_node) -> None:
    settings.APPLIANCE_NODE_DOWN_AFTER = 15
    make_node("a", age=10)
    assert api.get("/api/v1/nodes/a/").json()["status"] == "up"
    settings.APPLIANCE_NODE_DOWN_AFTER = 5  # the same beat, now too old
    assert api.get("/api/v1/nodes/a/").json()["status"] == "down"


def test_nodes_are_read_only(api, make_node) -> None:
    make_node("a")
    assert api.post("/api/v1/nodes/", {"name": "b"}, format="json").status_code == 405
    assert api.patch("/api/v1/nodes/a/", {"labels": []}, format="json").status_code == 405
    assert api.delete("/api/v1/nodes/a/").status_code == 405


def test_filters(api, make_node) -> None:
    make_node("a", labels=["ssd"])
    make_node("b", age=3600, labels=["ssd", "hdd"])
    make_node("c", labels=["hdd"])

    def names(query: str) -> list[str]:
        response = api.get(f"/api/v1/nodes/?{query}")
        assert response.status_code == 200, response.json()
        return [n["name"] for n in response.json()["results"]]

    assert names("status=up") == ["a", "c"]
    assert names("status=down") == ["b"]
    assert names("label=ssd") == ["a", "b"]
    assert names("label=hdd&status=up") == ["c"]
    assert names("ordering=-free_bytes&name=c") == ["c"]
    assert api.get("/api/v1/nodes/?status=sideways").status_code == 400


# ------------------------------------------------------------------ images


def create(api, **body):
    return api.post("/api/v1/images/", {"name": "disk", "size": 64 * MiB, **body},
                    format="json")


def test_an_image_is_placed_on_the_named_node(api, settings, make_node) -> None:
    make_node("node1", free=900 * GiB)
    make_node("node2", free=GiB)
    settings.APPLIANCE_NODE_NAME = "node2"  # the files stay in this process (see test_nodes)
    response = create(api, node="node2")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["node"] == "node2"
    assert "labels" not in body  # a placement hint, never shown
    assert Image.objects.get(pk=body["id"]).node == "node2"
    assert api.get(f"/api/v1/images/{body['id']}/").json()["node"] == "node2"
    assert [i["name"] for i in api.get("/api/v1/images/?node=node2").json()["results"]] == [
        "disk"]
    assert api.get("/api/v1/images/?node=node1").json()["count"] == 0


def test_an_image_goes_to_the_most_free_node_with_the_labels(api, settings, make_node) -> None:
    make_node("node1", free=900 * GiB)
    make_node("node2", free=5 * GiB, labels=["ssd"])
    make_node("node3", free=GiB, labels=["ssd"])
    settings.APPLIANCE_NODE_NAME = "node2"
    response = create(api, labels=["ssd"])
    assert response.status_code == 201, response.json()
    assert response.json()["node"] == "node2"
    settings.APPLIANCE_NODE_NAME = "node1"
    assert create(api, name="plain").json()["node"] == "node1"


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [({"node": "node9"}, 400, "node_unavailable", "there is no node named 'node9'"),
     ({"node": "down"}, 400, "node_unavailable", "node 'down' is down"),
     ({"labels": ["nvme"]}, 409, "no_node_available", "has the labels nvme"),
     ({"node": "node1", "labels": ["nvme"]}, 400, "node_unavailable", "lacks the labels")],
)
def test_bad_placement_is_refused(api, make_node, body, status, code, fragment) -> None:
    make_node("node1")
    make_node("down", age=3600)
    response = create(api, **body)
    assert response.status_code == status, response.json()
    answer = response.json()
    assert answer["code"] == code
    assert fragment in answer["detail"]
    if code == "node_unavailable":
        assert answer["node"] == [answer["detail"]]
    assert not Image.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [({"node": "bad host!"}, "node", "host name"),
     ({"labels": "ssd"}, "labels", "Expected a list"),
     ({"labels": ["two words"]}, "labels", "a label is 1 to 63")],
)
def test_placement_input_is_validated(api, body, field, fragment) -> None:
    response = create(api, **body)
    assert response.status_code == 400
    assert fragment in " ".join(response.json()[field])


def test_the_node_of_an_image_is_read_only_afterwards(api, make_image) -> None:
    image = make_image("disk")
    url = f"/api/v1/images/{image.pk}/"
    same = api.put(url, {"name": "disk", "description": "d", "node": "node1"}, format="json")
    assert same.status_code == 200, same.json()
    moved = api.patch(url, {"node": "node2"}, format="json")
    assert moved.status_code == 400
    assert "is on node 'node1'" in moved.json()["node"][0]
    labels = api.patch(url, {"labels": ["ssd"]}, format="json")
    assert labels.status_code == 400
    assert "labels" in labels.json()
    assert Image.objects.get(pk=image.pk).node == "node1"


def test_a_clone_stays_on_its_source_node(api, make_image) -> None:
    image = make_image("disk")
    response = api.post(f"/api/v1/images/{image.pk}/clone", {"name": "copy"}, format="json")
    assert response.status_code == 201
    assert response.json()["node"] == "node1"


def test_an_import_takes_node_and_labels_in_the_query(api, settings, make_node) -> None:
    make_node("node1", free=900 * GiB)
    make_node("node2", free=GiB, labels=["ssd", "fast"])
    settings.APPLIANCE_NODE_NAME = "node2"
    response = api.generic("POST", "/api/v1/images/import?name=up&labels=ssd,fast",
                           bytes(MiB), content_type="application/octet-stream")
    assert response.status_code == 201, response.json()
    assert response.json()["node"] == "node2"
    refused = api.generic("POST", "/api/v1/images/import?name=up2&node=node1&labels=ssd",
                          bytes(MiB), content_type="application/octet-stream")
    assert refused.status_code == 400
    assert refused.json()["code"] == "node_unavailable"


def test_a_central_host_shows_the_sizes_and_free_space_the_nodes_measured(
        api, settings, make_node, make_image) -> None:
    first, second = make_image("first"), make_image("second")
    place_on(second, "node2")
    make_node("node1", free=3 * GiB)
    make_node("node2", free=5 * GiB)
    make_node("node3", free=7 * GiB, age=3600)  # down
    from appliance.nodes.models import Node

    Node.objects.filter(name="node1").update(image_usage={str(first.pk): [64 * MiB, MiB]})
    Node.objects.filter(name="node2").update(image_usage={str(second.pk): [64 * MiB, 0]})
    settings.APPLIANCE_ROLE = "central"  # none of the files is here

    listed = {i["name"]: i for i in api.get("/api/v1/images/").json()["results"]}
    assert (listed["first"]["virtual_size"], listed["first"]["allocated_size"]) == (
        64 * MiB, MiB)
    assert (listed["second"]["virtual_size"], listed["second"]["allocated_size"]) == (
        64 * MiB, 0)
    detail = api.get(f"/api/v1/images/{first.pk}/").json()
    assert (detail["virtual_size"], detail["allocated_size"]) == (64 * MiB, MiB)
    usage = api.get("/api/v1/images/usage").json()
    assert usage["free"] == 8 * GiB  # the nodes that are up


# ------------------------------------------------------------------ exports


def test_an_export_is_served_by_its_images_node(api, make_node, make_image) -> None:
    make_node("node1", nbd_host="192.0.2.1")
    make_node("node2", nbd_host="nbd2.example.net", nbd_port=10900)
    here = make_image("here")
    there = place_on(make_image("there"), "node2")
    a = api.post("/api/v1/exports/", {"name": "a", "image": here.pk}, format="json").json()
    b = api.post("/api/v1/exports/", {"name": "b", "image": there.pk, "node": "node1",
                                      "tls_policy": "optional"}, format="json").json()
    assert (a["node"], a["available"], a["uri"], a["tls_uri"]) == (
        "node1", True, "nbd://192.0.2.1/a", None)
    assert (b["node"], b["available"], b["uri"], b["tls_uri"]) == (
        "node2", True, "nbd://nbd2.example.net:10900/b", "nbds://nbd2.example.net:10900/b")
    # the export follows its image to another node
    moved = api.patch(f"/api/v1/exports/{a['id']}/", {"image": there.pk}, format="json")
    assert moved.status_code == 200, moved.json()
    assert moved.json()["node"] == "node2"
    assert moved.json()["uri"] == "nbd://nbd2.example.net:10900/a"
    ignored = api.patch(f"/api/v1/exports/{a['id']}/", {"node": "node1"}, format="json")
    assert ignored.json()["node"] == "node2"  # read-only


def test_an_export_on_a_down_node_is_unavailable(api, settings, make_node, make_export) -> None:
    settings.APPLIANCE_NODE_DOWN_AFTER = 15
    make_node("node1")
    make_node("node2", age=20)
    up = make_export("up")
    down = make_export("down", node="node2")
    listed = {e["name"]: e["available"] for e in api.get("/api/v1/exports/").json()["results"]}
    assert listed == {"up": True, "down": False}
    assert api.get(f"/api/v1/exports/{down.pk}/").json()["available"] is False
    live = api.get(f"/api/v1/exports/{down.pk}/live").json()
    assert (live["node"], live["node_available"]) == ("node2", False)
    assert api.get(f"/api/v1/exports/{up.pk}/live").json()["node_available"] is True
    make_node("node2")  # it beats again
    assert api.get(f"/api/v1/exports/{down.pk}/").json()["available"] is True


def test_uris_fall_back_to_the_settings_without_a_node_row(api, settings, make_export) -> None:
    settings.NBD_PUBLIC_HOST = "nbd.example.org"
    settings.NBD_PORT = 10811
    export = make_export("vm1", tls_policy="required")
    body = api.get(f"/api/v1/exports/{export.pk}/").json()
    assert body["uri"] == "nbds://nbd.example.org:10811/vm1"
    assert body["tls_uri"] == "nbds://nbd.example.org:10811/vm1"
    assert body["available"] is False  # no engine worker ever registered node1


def test_the_exports_list_looks_nodes_up_once(api, make_node, make_export,
                                              django_assert_max_num_queries) -> None:
    make_node("node1")
    for i in range(5):
        make_export(f"vm{i}")
    with django_assert_max_num_queries(8):
        response = api.get("/api/v1/exports/")
    assert response.json()["count"] == 5


def test_schema_describes_nodes_and_placement(api) -> None:
    schema = api.get("/api/schema/?format=json").json()
    node = schema["components"]["schemas"]["Node"]["properties"]
    assert node["status"]["allOf"] == [{"$ref": "#/components/schemas/NodeStatusEnum"}]
    assert schema["components"]["schemas"]["NodeStatusEnum"]["enum"] == ["up", "down"]
    request = schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert request["labels"]["type"] == "array"
    assert "node" in request
    image = schema["components"]["schemas"]["Image"]["properties"]
    assert "labels" not in image
    export = schema["components"]["schemas"]["Export"]["properties"]
    assert export["node"]["readOnly"] is True
    assert export["available"]["type"] == "boolean"
    assert "node" not in schema["components"]["schemas"]["ExportRequest"]["properties"]


def test_admin_shows_nodes_read_only(admin_client, make_node) -> None:
    node = make_node("node1")
    listed = admin_client.get("/admin/nodes/node/")
    assert listed.status_code == 200
    assert b"node1" in listed.content
    page = admin_client.get(f"/admin/nodes/node/{node.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.get("/admin/nodes/node/add/").status_code == 403
