"""/api/v1/images/: CRUD, grow, clone, import, usage; every refusal names its field."""

from __future__ import annotations

import pytest
from appliance_testing import GiB, MiB, allocated, data_ranges
from conftest import make_sparse_image

from appliance.storage.models import Image
from appliance.storage.services import image_path

pytestmark = pytest.mark.django_db

ISLANDS = {0: b"\xeb\x3c\x90" + b"boot" * 100, 3 * MiB: b"\x5a" * 9000}


def create(api, name: str = "disk", size: int = 64 * MiB, **extra):
    return api.post("/api/v1/images/", {"name": name, "size": size, **extra}, format="json")


def sparse_body(tmp_path, size: int = 16 * MiB) -> bytes:
    return make_sparse_image(tmp_path / "upload.raw", size, ISLANDS).read_bytes()


# ------------------------------------------------------------------ create / read


def test_create_a_10_gib_image(api) -> None:
    response = create(api, "big", 10 * GiB, description="ten gigs")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["name"] == "big"
    assert body["description"] == "ten gigs"
    assert body["size"] == body["virtual_size"] == 10 * GiB
    assert body["allocated_size"] <= 64 * 1024
    assert body["exports"] == []
    assert body["cloned_from"] is None
    path = image_path(Image.objects.get(pk=body["id"]))
    assert path.stat().st_size == 10 * GiB
    assert allocated(path) == body["allocated_size"]


@pytest.mark.parametrize(
    ("payload", "field", "fragment"),
    [
        ({"name": "../../etc/passwd", "size": MiB}, "name", "not a path"),
        ({"name": "/var/lib/disk", "size": MiB}, "name", "not a path"),
        ({"name": "a/b", "size": MiB}, "name", "not a path"),
        ({"name": "", "size": MiB}, "name", "may not be blank"),
        ({"name": "disk", "size": -1}, "size", "got -1"),
        ({"name": "disk", "size": 1000}, "size", "multiple of 512 bytes"),
        ({"name": "disk", "size": 2**70}, "size", "less than or equal to"),
        ({"name": "disk", "size": "10G"}, "size", "A valid"),
        ({"name": "disk"}, "size", "This field is required."),
        ({"size": MiB}, "name", "This field is required."),
    ],
)
def test_create_refuses_bad_input_naming_the_field(api, storage_root, payload, field, fragment):
    response = api.post("/api/v1/images/", payload, format="json")
    assert response.status_code == 400
    body = response.json()
    assert field in body, body
    assert fragment in " ".join(body[field])
    assert not Image.objects.exists()
    assert not storage_root.exists() or not any(storage_root.iterdir())


def test_create_refuses_a_taken_name(api) -> None:
    first = create(api, "disk").json()
    response = create(api, "disk")
    assert response.status_code == 400
    assert response.json() == {
        "name": [f"an image named 'disk' already exists (id {first['id']}); choose another name"]
    }


def test_quota_and_free_space_refusals_are_409(api, settings) -> None:
    settings.APPLIANCE_PROVISION_QUOTA = 100 * MiB
    assert create(api, "a", 64 * MiB).status_code == 201
    over = create(api, "b", 64 * MiB)
    assert over.status_code == 409
    body = over.json()
    assert body["code"] == "quota_exceeded"
    assert "quota is 100 MiB" in body["detail"]
    assert body["size"] == [body["detail"]]
    settings.APPLIANCE_STORAGE_RESERVE = 1 << 60
    full = create(api, "c", MiB)
    assert full.status_code == 409
    assert full.json()["code"] == "insufficient_space"
    assert Image.objects.count() == 1


def test_list_paginates_filters_and_orders(api) -> None:
    for name, size in [("alpha", 3 * MiB), ("beta", MiB), ("gamma", 2 * MiB)]:
        assert create(api, name, size).status_code == 201
    page = api.get("/api/v1/images/?page_size=2&ordering=name").json()
    assert page["count"] == 3
    assert [i["name"] for i in page["results"]] == ["alpha", "beta"]
    assert page["next"].endswith("page=2&page_size=2&ordering=name") or "page=2" in page["next"]
    second = api.get(page["next"]).json()
    assert [i["name"] for i in second["results"]] == ["gamma"]
    by_size = api.get("/api/v1/images?ordering=-size").json()
    assert [i["name"] for i in by_size["results"]] == ["alpha", "gamma", "beta"]
    found = api.get("/api/v1/images/?name__icontains=MM").json()
    assert [i["name"] for i in found["results"]] == ["gamma"]


def test_retrieve_and_not_found(api) -> None:
    image = create(api).json()
    got = api.get(f"/api/v1/images/{image['id']}")
    assert got.status_code == 200
    assert got.json()["virtual_size"] == 64 * MiB
    missing = api.get("/api/v1/images/999999/")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "No Image matches the given query.", "code": "not_found"}


# ------------------------------------------------------------------ update / delete


def test_patch_renames_but_never_resizes(api) -> None:
    image = create(api, "disk").json()
    create(api, "other")
    renamed = api.patch(f"/api/v1/images/{image['id']}/", {"name": "disk2"}, format="json")
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "disk2"
    resized = api.patch(f"/api/v1/images/{image['id']}/", {"size": 2 * GiB}, format="json")
    assert resized.status_code == 400
    assert f"/api/v1/images/{image['id']}/grow" in resized.json()["size"][0]
    replaced = api.put(f"/api/v1/images/{image['id']}", {"name": "disk3", "description": "d"},
                       format="json")
    assert replaced.status_code == 200, replaced.json()
    assert (replaced.json()["name"], replaced.json()["description"]) == ("disk3", "d")
    taken = api.patch(f"/api/v1/images/{image['id']}/", {"name": "other"}, format="json")
    assert taken.status_code == 400
    assert "already exists" in taken.json()["name"][0]
    assert Image.objects.get(pk=image["id"]).size == 64 * MiB


def test_delete_removes_the_file(api, django_capture_on_commit_callbacks) -> None:
    image = create(api).json()
    path = image_path(Image.objects.get(pk=image["id"]))
    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/api/v1/images/{image['id']}/")
    assert response.status_code == 204
    assert not path.exists()
    assert not Image.objects.exists()


def test_delete_is_refused_while_exported(api, make_export) -> None:
    export = make_export("vm1")
    response = api.delete(f"/api/v1/images/{export.image.pk}/")
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "image_in_use"
    assert "'vm1'" in body["detail"]
    assert image_path(export.image).exists()


# ------------------------------------------------------------------ grow / clone


def test_grow_and_shrink(api, make_export) -> None:
    image = create(api).json()
    url = f"/api/v1/images/{image['id']}/grow"
    grown = api.post(url, {"size": 10 * GiB}, format="json")
    assert grown.status_code == 200
    assert grown.json()["virtual_size"] == 10 * GiB
    refused = api.post(url, {"size": MiB}, format="json")
    assert refused.status_code == 400
    assert refused.json()["code"] == "shrink_not_forced"
    assert "force=true" in refused.json()["size"][0]
    bad = api.post(url, {"size": 1000, "force": "maybe"}, format="json")
    assert bad.status_code == 400
    assert set(bad.json()) == {"size", "force"}
    shrunk = api.post(url, {"size": MiB, "force": True}, format="json")
    assert shrunk.status_code == 200
    assert shrunk.json()["virtual_size"] == MiB

    exported = make_export("vm1")
    in_use = api.post(
        f"/api/v1/images/{exported.image.pk}/grow", {"size": MiB, "force": True}, format="json"
    )
    assert in_use.status_code == 409
    assert in_use.json()["code"] == "image_in_use"


def test_clone(api, tmp_path) -> None:
    body = sparse_body(tmp_path)
    source = api.post(
        "/api/v1/images/import?name=golden", body, content_type="application/octet-stream"
    ).json()
    response = api.post(f"/api/v1/images/{source['id']}/clone", {"name": "copy"}, format="json")
    assert response.status_code == 201, response.json()
    clone = response.json()
    assert clone["cloned_from"] == source["id"]
    assert clone["virtual_size"] == 16 * MiB
    assert clone["allocated_size"] <= source["allocated_size"]
    src = image_path(Image.objects.get(pk=source["id"]))
    dst = image_path(Image.objects.get(pk=clone["id"]))
    assert dst.read_bytes() == src.read_bytes()
    assert data_ranges(dst) == data_ranges(src)
    taken = api.post(f"/api/v1/images/{source['id']}/clone", {"name": "copy"}, format="json")
    assert taken.status_code == 400
    assert "already exists" in taken.json()["name"][0]
    bad = api.post(f"/api/v1/images/{source['id']}/clone", {"name": "../x"}, format="json")
    assert bad.status_code == 400
    assert "not a path" in bad.json()["name"][0]


# ------------------------------------------------------------------ import


def test_create_from_upload_stays_sparse(api, tmp_path) -> None:
    body = sparse_body(tmp_path, 64 * MiB)
    response = api.post(
        "/api/v1/images/import?name=uploaded&description=from+curl",
        body,
        content_type="application/octet-stream",
    )
    assert response.status_code == 201, response.json()
    image = response.json()
    assert image["name"] == "uploaded"
    assert image["description"] == "from curl"
    assert image["virtual_size"] == 64 * MiB
    assert image["allocated_size"] <= 64 * 1024
    path = image_path(Image.objects.get(pk=image["id"]))
    assert path.read_bytes() == body
    assert data_ranges(path) == data_ranges(tmp_path / "upload.raw")


def test_import_replaces_an_image(api, tmp_path) -> None:
    image = create(api, "disk", 64 * MiB).json()
    body = sparse_body(tmp_path, 4 * MiB)
    response = api.put(
        f"/api/v1/images/{image['id']}/import", body, content_type="application/octet-stream"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["virtual_size"] == 4 * MiB == response.json()["size"]
    assert image_path(Image.objects.get(pk=image["id"])).read_bytes() == body


def test_import_refusals(api, make_export) -> None:
    image = create(api, "disk").json()
    url = f"/api/v1/images/{image['id']}/import"
    json_body = api.put(url, {"data": "x"}, format="json")
    assert json_body.status_code == 415
    assert json_body.json()["code"] == "unsupported_media_type"
    assert "application/octet-stream" in json_body.json()["detail"]
    no_length = api.put(url, b"x" * 512, content_type="application/octet-stream",
                        CONTENT_LENGTH="")
    assert no_length.status_code == 411
    assert no_length.json()["code"] == "length_required"
    chunked = api.put(url, b"x" * 512, content_type="application/octet-stream",
                      HTTP_TRANSFER_ENCODING="chunked")
    assert chunked.status_code == 411
    empty = api.put(url, b"", content_type="application/octet-stream", CONTENT_LENGTH="0")
    assert empty.status_code == 400
    assert "Content-Length" in empty.json()["size"][0]
    odd = api.put(url, b"x" * 1000, content_type="application/octet-stream")
    assert odd.status_code == 400
    assert "multiple of 512" in odd.json()["size"][0]

    exported = make_export("vm1")
    in_use = api.put(f"/api/v1/images/{exported.image.pk}/import", bytes(MiB),
                     content_type="application/octet-stream")
    assert in_use.status_code == 409
    assert in_use.json()["code"] == "image_in_use"
    assert Image.objects.get(pk=image["id"]).size == 64 * MiB


def test_create_from_upload_refusals(api) -> None:
    raw = "application/octet-stream"
    missing = api.post("/api/v1/images/import", bytes(MiB), content_type=raw)
    assert missing.status_code == 400
    assert missing.json() == {"name": ["This field is required."]}
    bad = api.post("/api/v1/images/import?name=../x", bytes(MiB), content_type=raw)
    assert bad.status_code == 400
    assert "not a path" in bad.json()["name"][0]
    create(api, "taken")
    taken = api.post("/api/v1/images/import?name=taken", bytes(MiB), content_type=raw)
    assert taken.status_code == 400
    assert "already exists" in taken.json()["name"][0]
    assert Image.objects.count() == 1


def test_usage(api) -> None:
    create(api, "a", 10 * GiB)
    usage = api.get("/api/v1/images/usage").json()
    assert usage["images"] == 1
    assert usage["provisioned"] == 10 * GiB
    assert usage["quota"] == 64 << 40
    assert usage["free"] > 0
    assert usage["reserve"] == 0
