"""nbdinfo (libnbd 1.14) against the engine: export info, listing, --can/--is, --map."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import file_extents, make_sparse_image, require

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry

from .helpers import IMAGE_SIZE, MiB, expected_runs, make_islands_image, merge, run, run_json

pytestmark = pytest.mark.interop

WRITABLE_TRUE = ("write", "read", "connect", "flush", "fua", "trim", "zero", "fast-zero",
                 "df", "multi-conn", "cache", "structured-reply")


@pytest.fixture(autouse=True)
def _nbdinfo() -> None:
    require("nbdinfo")


def only_export(info: dict) -> dict:
    assert len(info["exports"]) == 1, info
    return info["exports"][0]


def test_json_of_a_writable_export(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image, "--export", "disk", "--description", "the test disk")
    info = run_json(["nbdinfo", "--json", server.uri("disk")])
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True
    export = only_export(info)
    assert export["export-name"] == "disk"
    assert export["description"] == "the test disk"
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is False
    assert export["is_rotational"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                 "can_cache", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 33554432
    assert "base:allocation" in export["contexts"]


def test_json_of_a_read_only_export(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "ro.raw")
    server = serve(image, "--read-only")
    export = only_export(run_json(["nbdinfo", "--json", server.uri()]))
    assert export["export-name"] == ""
    assert export["export-size"] == IMAGE_SIZE
    assert export["is_read_only"] is True
    for flag in ("can_trim", "can_zero", "can_fast_zero"):
        assert export[flag] is False, flag
    # Reads may go over several connections; structured reads still allow DF.
    assert export["can_multi_conn"] is True
    assert export["can_df"] is True
    assert export["can_cache"] is True
    assert "base:allocation" in export["contexts"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 33554432)


def test_no_multi_conn_option_clears_the_flag(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "d.raw", 4 * MiB)
    server = serve(image, "--no-multi-conn")
    export = only_export(run_json(["nbdinfo", "--json", server.uri()]))
    assert export["can_multi_conn"] is False
    assert export["is_read_only"] is False
    assert run(["nbdinfo", "--can", "multi-conn", server.uri()]).returncode == 2


def test_export_name_with_a_space_and_a_utf8_description(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "d.raw", 2 * MiB)
    server = serve(image, "--export", "my disk", "--description", "disque ünïcode ✓")
    export = only_export(run_json(["nbdinfo", "--json", server.uri("my%20disk")]))
    assert export["export-name"] == "my disk"
    assert export["description"] == "disque ünïcode ✓"
    assert export["export-size"] == 2 * MiB
    listed = run_json(["nbdinfo", "--list", "--json", server.uri()])
    assert [(e["export-name"], e["description"]) for e in listed["exports"]] == [
        ("my disk", "disque ünïcode ✓")]


def test_size_option_prints_the_exact_size(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "odd.raw", 5 * MiB + 512)
    server = serve(image)
    result = run(["nbdinfo", "--size", server.uri()])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(5 * MiB + 512)


def _list_by_name(uri: str) -> dict[str, dict]:
    info = run_json(["nbdinfo", "--list", "--json", uri])
    assert info["structured"] is True
    return {e["export-name"]: e for e in info["exports"]}


def test_list_several_exports_of_one_server(serve, tmp_path: Path) -> None:
    alpha = make_sparse_image(tmp_path / "alpha.raw", 4 * MiB)
    beta = make_sparse_image(tmp_path / "beta.raw", 8 * MiB)
    default = make_sparse_image(tmp_path / "default.raw", 2 * MiB)
    server = serve(
        alpha, "--export", "alpha", "--description", "first disk",
        beta, "--export", "beta", "--read-only", "--description", "second disk",
        default,
    )
    exports = _list_by_name(server.uri())
    assert set(exports) == {"alpha", "beta", ""}
    assert exports["alpha"]["description"] == "first disk"
    assert exports["beta"]["description"] == "second disk"
    assert exports["alpha"]["export-size"] == 4 * MiB
    assert exports["beta"]["export-size"] == 8 * MiB
    assert exports[""]["export-size"] == 2 * MiB
    assert exports["alpha"]["is_read_only"] is False
    assert exports["beta"]["is_read_only"] is True
    assert exports[""]["is_read_only"] is False


def test_list_several_exports_engine_in_process(inprocess_server, tmp_path: Path) -> None:
    """The same listing with the registry built directly (independent of the CLI parser)."""
    backends = [
        SparseFile(make_sparse_image(tmp_path / "alpha.raw", 4 * MiB)),
        SparseFile(make_sparse_image(tmp_path / "beta.raw", 8 * MiB), read_only=True),
        SparseFile(make_sparse_image(tmp_path / "default.raw", 2 * MiB)),
    ]
    registry = ExportRegistry([
        Export(name="alpha", backend=backends[0], description="first disk"),
        Export(name="beta", backend=backends[1], description="second disk", read_only=True),
        Export(name="", backend=backends[2]),
    ])
    try:
        server = inprocess_server(registry)
        exports = _list_by_name(f"nbd://127.0.0.1:{server.port}/")
        assert set(exports) == {"alpha", "beta", ""}
        assert exports["alpha"]["description"] == "first disk"
        assert exports["beta"]["description"] == "second disk"
        assert [exports[n]["export-size"] for n in ("alpha", "beta", "")] == [
            4 * MiB, 8 * MiB, 2 * MiB]
        assert exports["beta"]["is_read_only"] is True
        assert exports["alpha"]["is_read_only"] is False
    finally:
        for backend in backends:
            backend.close()


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_can_and_is_exit_codes(serve, tmp_path: Path, read_only: bool) -> None:
    image = make_sparse_image(tmp_path / "d.raw", 4 * MiB)
    server = serve(image, "--read-only") if read_only else serve(image)
    uri = server.uri()
    expected: dict[tuple[str, str], bool] = {
        ("--can", "connect"): True,
        ("--can", "read"): True,
        ("--can", "structured-reply"): True,
        ("--can", "df"): True,
        ("--can", "cache"): True,
        ("--can", "multi-conn"): True,
        ("--is", "rotational"): False,
        ("--is", "tls"): False,
        ("--is", "read-only"): read_only,
        ("--can", "write"): not read_only,
        ("--can", "trim"): not read_only,
        ("--can", "zero"): not read_only,
        ("--can", "fast-zero"): not read_only,
    }
    if not read_only:
        expected[("--can", "flush")] = True
        expected[("--can", "fua")] = True
    got = {}
    for (option, what) in expected:
        result = run(["nbdinfo", option, what, uri])
        assert result.returncode in (0, 2), (option, what, result.stderr)
        got[(option, what)] = result.returncode == 0
    assert got == expected


def test_map_matches_the_file_extents(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "islands.raw")
    server = serve(image)
    entries = run_json(["nbdinfo", "--map", "--json", server.uri()])
    assert isinstance(entries, list)
    for entry in entries:
        assert entry["type"] in (0, 3), entry  # data, or hole+zero: nothing else
        assert entry["description"] == ("data" if entry["type"] == 0 else "hole,zero")
    runs = merge((e["offset"], e["length"], not e["type"] & 1) for e in entries)
    assert runs == merge(file_extents(image))
    assert runs == expected_runs()


def test_map_totals(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "islands.raw")
    server = serve(image)
    totals = run_json(["nbdinfo", "--map", "--totals", "--json", server.uri()])
    by_type = {t["type"]: t["size"] for t in totals}  # type: ignore[union-attr]
    data = sum(length for _, length, is_data in file_extents(image) if is_data)
    assert by_type == {0: data, 3: IMAGE_SIZE - data}


def test_unknown_export_name_fails_with_a_message(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "d.raw", 1 * MiB)
    server = serve(image, "--export", "known")
    result = run(["nbdinfo", "--json", server.uri("no-such-export")])
    assert result.returncode == 1
    assert "export-size" not in result.stdout
    assert "no-such-export" in result.stderr
    assert "opt_go" in result.stderr or "export" in result.stderr.lower()
    # The server is still serving the real export afterwards.
    export = only_export(run_json(["nbdinfo", "--json", server.uri("known")]))
    assert export["export-size"] == 1 * MiB
