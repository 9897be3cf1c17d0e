"""Export services: names, networks, policy fields, uniqueness."""

from __future__ import annotations

import pytest
from appliance_testing import place_on
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from appliance.errors import ExportNameTaken
from appliance.exports.models import Export, TlsPolicy
from appliance.exports.selectors import export_allows_client, export_list, export_list_enabled
from appliance.exports.services import export_delete, export_publish, export_update

pytestmark = pytest.mark.django_db


def test_publish_with_every_field(make_image) -> None:
    image = place_on(make_image("disk"), "nbd-2.example.net")
    export = export_publish(
        image=image,
        name="vm1",
        description="test disk",
        read_only=True,
        enabled=False,
        allowed_networks=["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"],
        multi_conn=False,
        tls_policy=TlsPolicy.REQUIRED,
        node="nbd-2.example.net",
    )
    stored = Export.objects.get(pk=export.pk)
    assert (stored.name, stored.image, stored.description) == ("vm1", image, "test disk")
    assert stored.read_only
    assert not stored.enabled
    assert not stored.multi_conn
    assert stored.allowed_networks == ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"]
    assert stored.tls_policy == "required"
    assert stored.node == "nbd-2.example.net"


def test_defaults_serve_everyone_from_this_node(make_image) -> None:
    export = export_publish(image=make_image(), name="vm1")
    assert export.allowed_networks == []
    assert export.enabled
    assert export.multi_conn
    assert export.tls_policy == "off"
    assert not export.read_only
    assert export.node == "node1"  # settings.APPLIANCE_NODE_NAME


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "../vm", "/vm", "vm 1", "vm\n", "-vm", ".vm", "vm*", "x" * 256, "ünïcode"],
)
def test_bad_export_names_are_refused(make_image, name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        export_publish(image=make_image(), name=name)
    assert "name" in caught.value.message_dict
    assert not Export.objects.exists()


def test_longest_allowed_name_is_255(make_image) -> None:
    name = "v" * 255
    assert export_publish(image=make_image(), name=name).name == name


def test_a_taken_name_is_refused_with_the_owner_named(make_image) -> None:
    export_publish(image=make_image("first"), name="vm1")
    with pytest.raises(ExportNameTaken) as caught:
        export_publish(image=make_image("second"), name="vm1")
    assert caught.value.status == 409
    assert caught.value.field == "name"
    assert "image 'first'" in caught.value.message
    assert Export.objects.count() == 1


def test_the_database_enforces_unique_names(make_image) -> None:
    image = make_image()
    Export.objects.create(image=image, name="vm1")
    with pytest.raises(IntegrityError), transaction.atomic():
        Export.objects.create(image=image, name="vm1")


@pytest.mark.parametrize(
    ("networks", "fragment"),
    [
        (["10.0.0.1/8"], "did you mean '10.0.0.0/8'"),
        (["10.0.0.0/33"], "not a CIDR network"),
        (["not-a-net"], "not a CIDR network"),
        (["::1/129"], "not a CIDR network"),
        ([42], "is a string"),
        (["10.0.0.0/8"] * 65, "at most 64"),
        ("10.0.0.0/8", "must be a list"),
    ],
)
def test_bad_networks_are_refused(make_image, networks: object, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        export_publish(image=make_image(), name="vm1", allowed_networks=networks)  # type: ignore[arg-type]
    assert fragment in " ".join(caught.value.message_dict["allowed_networks"])


def test_networks_are_normalised_and_deduplicated(make_image) -> None:
    export = export_publish(
        image=make_image(), name="vm1", allowed_networks=["10.0.0.0/8", " 10.0.0.0/8", "::1"]
    )
    assert export.allowed_networks == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("field", "value"), [("tls_policy", "sometimes"), ("node", "bad host!"), ("node", "-a")]
)
def test_bad_policy_fields_are_refused(make_image, field: str, value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        export_publish(image=make_image(), name="vm1", **{field: value})
    assert field in caught.value.message_dict


def test_an_export_is_served_by_its_images_node(make_image) -> None:
    here = make_image("here")
    there = place_on(make_image("there"), "node2")
    export = export_publish(image=there, name="vm1")
    assert export.node == "node2"
    with pytest.raises(ValidationError) as caught:
        export_publish(image=there, name="vm2", node="node1")
    assert "image 'there' is on node 'node2', not 'node1'" in caught.value.message_dict["node"][0]
    export_update(export=export, image=here)  # a new image brings its node
    assert Export.objects.get(pk=export.pk).node == "node1"
    with pytest.raises(ValidationError):
        export_update(export=export, node="node2")  # not where its image is
    place_on(here, "node3")  # what a move does: the image's node changes, then the export's
    export_update(export=export, node="node3")
    assert Export.objects.get(pk=export.pk).node == "node3"


def test_update_changes_fields_and_keeps_names_unique(make_image) -> None:
    a = export_publish(image=make_image("a"), name="a")
    export_publish(image=make_image("b"), name="b")
    other = make_image("c")
    export_update(export=a, read_only=True, allowed_networks=["192.0.2.9"], image=other)
    a.refresh_from_db()
    assert a.read_only
    assert a.allowed_networks == ["192.0.2.9/32"]
    assert a.image == other
    with pytest.raises(ExportNameTaken):
        export_update(export=a, name="b")
    with pytest.raises(TypeError, match="unexpected fields: color"):
        export_update(export=a, color="blue")
    assert Export.objects.get(pk=a.pk).name == "a"


def test_delete_withdraws_the_export(make_export) -> None:
    export = make_export("vm1")
    export_delete(export=export)
    assert not Export.objects.exists()


def test_selectors_for_the_engine(make_image) -> None:
    image = make_image()
    export_publish(image=image, name="here", node="node1")
    export_publish(image=image, name="off", node="node1", enabled=False)
    export_publish(image=place_on(make_image("elsewhere"), "node2"), name="there")
    assert [e.name for e in export_list_enabled(node="node1")] == ["here"]
    assert [e.active_sessions for e in export_list()] == [0, 0, 0]


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        ([], "203.0.113.5", True),
        (["192.0.2.0/24"], "192.0.2.77", True),
        (["192.0.2.0/24"], "192.0.3.1", False),
        (["192.0.2.0/24"], "::ffff:192.0.2.1", True),
        (["2001:db8::/32"], "2001:db8::1", True),
        (["2001:db8::/32"], "192.0.2.1", False),
        (["192.0.2.0/24"], "garbage", False),
    ],
)
def test_allowed_networks_decide_who_may_connect(
    make_image, networks: list[str], address: str, allowed: bool
) -> None:
    export = export_publish(image=make_image(), name="vm1", allowed_networks=networks)
    assert export_allows_client(export, address) is allowed
