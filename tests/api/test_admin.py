"""The Django admin for every model; images and exports are changed through the services."""

from __future__ import annotations

import pytest
from appliance_testing import MiB, engine_snapshot
from django.contrib.auth import get_user_model

from appliance.exports.models import Export
from appliance.sessions.services import session_record_from_engine
from appliance.storage.models import Image
from appliance.storage.services import image_path

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    admin = get_user_model().objects.create_superuser("root", "root@example.net", "pw-admin-1")
    client.force_login(admin)
    return client


@pytest.mark.parametrize(
    "url",
    [
        "/admin/",
        "/admin/storage/image/",
        "/admin/storage/image/add/",
        "/admin/exports/export/",
        "/admin/exports/export/add/",
        "/admin/clientsessions/clientsession/",
        "/admin/authtoken/tokenproxy/",
    ],
)
def test_admin_pages_load(admin_client, make_export, url) -> None:
    make_export("vm1")
    session_record_from_engine(snapshot=engine_snapshot({"export_name": "vm1"}))
    response = admin_client.get(url)
    assert response.status_code == 200, url


def test_admin_creates_an_image_file(admin_client) -> None:
    response = admin_client.post(
        "/admin/storage/image/add/", {"name": "disk", "description": "", "size": 8 * MiB}
    )
    assert response.status_code == 302, response.content[-2000:]
    image = Image.objects.get(name="disk")
    assert image_path(image).stat().st_size == 8 * MiB
    page = admin_client.get(f"/admin/storage/image/{image.pk}/change/")
    assert page.status_code == 200
    assert b"8 MiB" in page.content


def test_admin_form_shows_service_refusals(admin_client, settings) -> None:
    bad = admin_client.post(
        "/admin/storage/image/add/", {"name": "../etc", "description": "", "size": 8 * MiB}
    )
    assert bad.status_code == 200
    assert b"not a path" in bad.content
    settings.APPLIANCE_PROVISION_QUOTA = 4 * MiB
    over = admin_client.post(
        "/admin/storage/image/add/", {"name": "disk", "description": "", "size": 8 * MiB}
    )
    assert over.status_code == 200
    assert b"provisioning quota" in over.content
    assert not Image.objects.exists()


def test_admin_grows_and_refuses_an_unforced_shrink(admin_client, make_image) -> None:
    image = make_image("disk", 8 * MiB)
    url = f"/admin/storage/image/{image.pk}/change/"
    grown = admin_client.post(url, {"name": "disk", "description": "", "size": 16 * MiB})
    assert grown.status_code == 302
    assert image_path(image).stat().st_size == 16 * MiB
    shrink = admin_client.post(url, {"name": "disk", "description": "", "size": 4 * MiB})
    assert shrink.status_code == 200
    assert b"force=true" in shrink.content
    forced = admin_client.post(
        url, {"name": "disk", "description": "", "size": 4 * MiB, "force_shrink": "on"}
    )
    assert forced.status_code == 302
    assert image_path(image).stat().st_size == 4 * MiB


def test_admin_publishes_an_export(admin_client, make_image) -> None:
    image = make_image("disk")
    response = admin_client.post(
        "/admin/exports/export/add/",
        {"name": "vm1", "image": image.pk, "description": "", "allowed_networks": '["10.1.2.3"]',
         "multi_conn": "on", "enabled": "on", "tls_policy": "off", "node": "node1",
         "allowed_clients": "[]", "max_connections": "0"},
    )
    assert response.status_code == 302, response.content[-3000:]
    assert Export.objects.get(name="vm1").allowed_networks == ["10.1.2.3/32"]
    taken = admin_client.post(
        "/admin/exports/export/add/",
        {"name": "vm1", "image": image.pk, "description": "", "allowed_networks": "[]",
         "tls_policy": "off", "node": "node1"},
    )
    assert taken.status_code == 200
    assert Export.objects.count() == 1


def test_admin_will_not_delete_an_exported_image(admin_client, make_export) -> None:
    export = make_export("vm1")
    page = admin_client.post(f"/admin/storage/image/{export.image.pk}/delete/", {"post": "yes"})
    assert page.status_code == 200
    assert b"protected" in page.content
    assert Image.objects.filter(pk=export.image.pk).exists()


def test_admin_shows_the_sizes_other_nodes_measured(admin_client, settings,
                                                    make_image) -> None:
    from datetime import timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from appliance.nodes.models import Node

    images = [make_image(f"disk{i}") for i in range(5)]
    now = timezone.now()
    Node.objects.create(name="node1", nbd_host="127.0.0.1", nbd_port=10809, started_at=now,
                        last_heartbeat=now - timedelta(seconds=1),
                        image_usage={str(i.pk): [64 * MiB, 3 * MiB] for i in images[1:]})
    settings.APPLIANCE_ROLE = "central"
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/storage/image/")
    html = page.content.decode()
    assert html.count(">3 MiB<") == 4
    assert "not measured by node1 yet" in html
    node_reads = [q for q in queries.captured_queries if '"nodes_node"' in q["sql"]]
    assert len(node_reads) == 1  # one query for the whole page


def test_admin_deletes_exports_through_the_service(
        admin_client, make_export, monkeypatch, django_capture_on_commit_callbacks) -> None:
    synced: list[str] = []
    monkeypatch.setattr("appliance.engine.tasks.request_sync", synced.append)
    one, two, three = make_export("vm1"), make_export("vm2"), make_export("vm3")
    session_record_from_engine(snapshot=engine_snapshot({"export_name": "vm1"}))
    with django_capture_on_commit_callbacks(execute=True):
        page = admin_client.post(f"/admin/exports/export/{one.pk}/delete/", {"post": "yes"})
        assert page.status_code == 302
        bulk = admin_client.post("/admin/exports/export/", {
            "action": "delete_selected", "_selected_action": [two.pk, three.pk],
            "post": "yes"})
        assert bulk.status_code == 302
    assert not Export.objects.exists()
    assert synced == ["node1", "node1", "node1"]  # the engine withdraws them at once
    assert get_session_export() is None


def get_session_export() -> object:
    from appliance.sessions.models import ClientSession

    return ClientSession.objects.get().export


def test_admin_sessions_are_read_only(admin_client) -> None:
    session = session_record_from_engine(snapshot=engine_snapshot({"export_name": "vm1"}))
    page = admin_client.get(f"/admin/clientsessions/clientsession/{session.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.get("/admin/clientsessions/clientsession/add/").status_code == 403
