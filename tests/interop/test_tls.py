"""TLS and access control with real clients: qemu-img/qemu-io (GnuTLS through qemu's
tls-creds objects), nbdinfo/nbdcopy (nbds:// URIs) and python3-libnbd.

The engine runs as ``python -m nbdcore serve`` with a test PKI from tests/tlsutil.py (the
same directory layout nbdkit and qemu-nbd read). Where the exact NBD reply matters (which
error a refused option gets), the tests' own client (tests/nbdclient.py) speaks to the
server, with ``tlsutil.start_tls`` for STARTTLS; libnbd 1.14 only says it indirectly
(NBD_REP_ERR_TLS_REQD on GO: errno ENOTSUP; NBD_REP_ERR_POLICY: "server policy prevents
NBD_OPT_GO", no errno).
"""

from __future__ import annotations

import filecmp
import glob
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    SYSTEM_PYTHON,
    ServerProcess,
    file_extents,
    make_sparse_image,
    require,
    require_libnbd_python,
)
from nbdclient import NbdClient, ServerClosed
from tlsutil import TestPki, make_test_pki, start_tls, write_psk_file

from nbdcore.protocol.constants import Opt, Rep

from .helpers import (
    CONST_A,
    IMAGE_SIZE,
    ISLAND_CONST_A,
    MiB,
    assert_sparse_copy,
    expected_runs,
    make_islands_image,
    make_junk_image,
    merge,
    read_range,
    run,
    run_json,
    run_ok,
)

pytestmark = pytest.mark.interop

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_islands_image(tmp_path / "disk.raw")


def certs(pki: TestPki, *, crl: bool = True) -> list[str]:
    return ["--tls-certificates", str(pki.server_dir if crl else pki.server_dir_no_crl)]


def nbds(server: ServerProcess, export: str, client_dir: Path) -> str:
    return f"nbds://{server.host}:{server.port}/{export}?tls-certificates={client_dir}"


def qemu_object(client_dir: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={client_dir}"]


def qemu_opts(server: ServerProcess, export: str) -> str:
    return (f"driver=nbd,host={server.host},port={server.port},export={export},"
            "tls-creds=tls0")


def libnbd(program: str, *, timeout: float = 60) -> dict:
    """Run a python3-libnbd program (Debian's python) that prints one JSON line."""
    require_libnbd_python()
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd, json, socket\n" + program],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def libnbd_connect(setup: str, connect: str) -> str:
    """A program that tries ``connect`` after ``setup`` and prints what happened."""
    return (
        "h = nbd.NBD()\n"
        "h.set_uri_allow_local_file(True)  # ?tls-certificates= names a directory\n"
        + setup + "\n"
        "try:\n"
        f"    {connect}\n"
        "except nbd.Error as exc:\n"
        "    print(json.dumps({'ok': False, 'errno': exc.errno, 'error': exc.string}))\n"
        "else:\n"
        "    print(json.dumps({'ok': True, 'tls': h.get_tls_negotiated(),\n"
        "                      'size': h.get_size(), 'head': h.pread(4096, 0).hex()}))\n"
        "    h.shutdown()\n"
    )


def raw_client(server: ServerProcess) -> NbdClient:
    """Our own client, greeting read and flags sent: ready for options."""
    client = NbdClient.connect(server.port, server.host)
    client.read_greeting()
    client.send_client_flags()
    return client


def refused_by_tls(client: NbdClient) -> bool:
    """The server broke off the TLS session (a certificate it did not accept)."""
    try:
        reply = client.option(Opt.LIST)[-1]
    except (ssl.SSLError, ServerClosed, ConnectionError):
        return True
    raise AssertionError(f"the server answered over TLS: {reply}")


# ------------------------------------------------------------------ qemu-img, qemu-io


@pytest.fixture
def _qemu() -> None:
    require("qemu-img", "qemu-io")


@pytest.mark.usefixtures("_qemu")
def test_qemu_img_info_and_map_over_tls(serve, pki: TestPki, image: Path) -> None:
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    info = run_json(["qemu-img", "info", "--output=json", *qemu_object(pki.client("alice")),
                     "--image-opts", qemu_opts(server, "disk")])
    assert info["virtual-size"] == IMAGE_SIZE
    entries = run_json(["qemu-img", "map", "--output=json",
                        *qemu_object(pki.client("alice")),
                        "--image-opts", qemu_opts(server, "disk")])
    assert merge((e["start"], e["length"], e["data"]) for e in entries) == expected_runs()


@pytest.mark.usefixtures("_qemu")
def test_qemu_img_convert_over_tls_keeps_data_and_holes(serve, pki: TestPki, image: Path,
                                                        tmp_path: Path) -> None:
    server = serve(image, "--export", "disk", "--read-only", "--export-tls", "required",
                   *certs(pki), "--tls", "required")
    out = tmp_path / "out.raw"
    run_ok(["qemu-img", "convert", *qemu_object(pki.client("alice")),
            "--image-opts", qemu_opts(server, "disk"), "-O", "raw", out])
    assert filecmp.cmp(image, out, shallow=False)
    assert_sparse_copy(image, out)
    assert merge(file_extents(out)) == expected_runs()


@pytest.mark.usefixtures("_qemu")
def test_qemu_io_writes_and_reads_over_tls(serve, pki: TestPki, image: Path) -> None:
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    at = 30 * MiB  # in a hole of the image
    result = run(["qemu-io", *qemu_object(pki.client("alice")),
                  "--image-opts", qemu_opts(server, "disk"),
                  "-c", f"write -P 0xab {at} 1M", "-c", "flush",
                  "-c", f"read -P 0xab {at} 1M",
                  "-c", f"read -P {CONST_A:#x} {ISLAND_CONST_A[0]} {ISLAND_CONST_A[1]}",
                  "-c", "read -P 0 40M 1M"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fail" not in result.stdout.lower(), result.stdout
    assert f"wrote 1048576/1048576 bytes at offset {at}" in result.stdout
    assert read_range(image, at, MiB) == b"\xab" * MiB  # on disk, byte for byte


# ------------------------------------------------------------------ nbdinfo, nbdcopy


@pytest.fixture
def _libnbd_tools() -> None:
    require("nbdinfo", "nbdcopy")


@pytest.mark.usefixtures("_libnbd_tools")
def test_nbdinfo_over_tls(serve, pki: TestPki, image: Path) -> None:
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    info = run_json(["nbdinfo", "--json", nbds(server, "disk", pki.client("alice"))])
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    entries = run_json(["nbdinfo", "--map", "--json",
                        nbds(server, "disk", pki.client("alice"))])
    assert merge((e["offset"], e["length"], not e["type"] & 1) for e in entries) == (
        expected_runs())


@pytest.mark.usefixtures("_libnbd_tools")
def test_nbdinfo_list_over_tls_and_in_clear_text(serve, pki: TestPki, tmp_path: Path) -> None:
    public = make_sparse_image(tmp_path / "public.raw", MiB)
    secret = make_sparse_image(tmp_path / "secret.raw", 2 * MiB)
    server = serve(public, "--export", "public", secret, "--export", "secret",
                   "--export-tls", "required", *certs(pki))
    over_tls = run_json(["nbdinfo", "--list", "--json", nbds(server, "", pki.client("alice"))])
    assert over_tls["TLS"] is True
    assert sorted(e["export-name"] for e in over_tls["exports"]) == ["public", "secret"]
    # Before TLS, LIST leaves out the export a clear-text client could not use.
    clear = run_json(["nbdinfo", "--list", "--json", server.uri()])
    assert clear["TLS"] is False
    assert [e["export-name"] for e in clear["exports"]] == ["public"]


@pytest.mark.usefixtures("_libnbd_tools")
@pytest.mark.parametrize("data_path", [[], ["--sendfile", "always"]], ids=["default", "sendfile"])
def test_nbdcopy_from_and_to_a_tls_export(serve, pki: TestPki, image: Path, tmp_path: Path,
                                          data_path: list[str]) -> None:
    """With --sendfile too: sendfile cannot go through TLS, the server must not use it."""
    target = make_junk_image(tmp_path / "target.raw")
    server = serve(image, "--export", "src", "--read-only", "--export-tls", "required",
                   target, "--export", "dst", "--export-tls", "required", *certs(pki),
                   *data_path)
    out = tmp_path / "out.raw"
    run_ok(["nbdcopy", nbds(server, "src", pki.client("alice")), out])
    assert filecmp.cmp(image, out, shallow=False)
    assert merge(file_extents(out)) == expected_runs()  # holes skipped, not written
    run_ok(["nbdcopy", "--flush", image, nbds(server, "dst", pki.client("alice"))])
    assert filecmp.cmp(image, target, shallow=False)


# ------------------------------------------------------------------ python3-libnbd


def test_libnbd_requires_and_negotiates_tls(serve, pki: TestPki, image: Path) -> None:
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    out = libnbd(libnbd_connect("h.set_tls(nbd.TLS_REQUIRE)",
                                f"h.connect_uri({nbds(server, 'disk', pki.client('alice'))!r})"))
    assert out["ok"] is True, out
    assert out["tls"] is True
    assert out["size"] == IMAGE_SIZE
    assert bytes.fromhex(out["head"]) == read_range(image, 0, 4096)


# ------------------------------------------------------------------ clear text refused


@pytest.mark.usefixtures("_libnbd_tools")
def test_clear_text_client_refused_on_a_tls_export(serve, pki: TestPki, image: Path) -> None:
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    result = run(["nbdinfo", server.uri("disk")])
    assert result.returncode != 0, result.stdout

    out = libnbd(libnbd_connect("h.set_tls(nbd.TLS_DISABLE)",
                                f"h.connect_uri({server.uri('disk')!r})"))
    assert out["ok"] is False
    assert out["errno"] == "ENOTSUP", out  # libnbd's errno for NBD_REP_ERR_TLS_REQD

    with raw_client(server) as client:
        final, _ = client.opt_go("disk")
        assert final.type == Rep.ERR_TLS_REQD, final
        assert b"TLS" in final.payload
        final, _ = client.opt_go("disk", option=Opt.INFO)
        assert final.type == Rep.ERR_TLS_REQD, final
    # EXPORT_NAME has no error reply: the server can only hang up.
    with raw_client(server) as client, pytest.raises(ServerClosed):
        client.opt_export_name("disk")


def test_server_wide_tls_refuses_every_clear_text_option(serve, pki: TestPki,
                                                         image: Path) -> None:
    require("nbdinfo")
    server = serve(image, "--export", "disk", *certs(pki), "--tls", "required")
    assert run(["nbdinfo", "--list", server.uri()]).returncode != 0
    assert run(["nbdinfo", server.uri("disk")]).returncode != 0
    listed = run_json(["nbdinfo", "--list", "--json", nbds(server, "", pki.client("alice"))])
    assert [e["export-name"] for e in listed["exports"]] == ["disk"]

    with raw_client(server) as client:
        for option in (Opt.LIST, Opt.STRUCTURED_REPLY):
            assert client.option(option)[-1].type == Rep.ERR_TLS_REQD
        assert client.opt_go("disk")[0].type == Rep.ERR_TLS_REQD
        # STARTTLS is still on offer, and after it everything works.
        start_tls(client, pki.client("alice"))
        names = [r.payload for r in client.option(Opt.LIST)[:-1]]
        assert len(names) == 1
        assert names[0].endswith(b"disk")
        final, details = client.opt_go("disk")
        assert final.type == Rep.ACK
        assert details is not None
        assert client.read(0, 4096).data() == read_range(image, 0, 4096)
    with raw_client(server) as client, pytest.raises(ServerClosed):
        client.opt_export_name("disk")


def test_starttls_forgets_what_was_negotiated_before(serve, pki: TestPki,
                                                     image: Path) -> None:
    server = serve(image, "--export", "disk", *certs(pki))
    with raw_client(server) as client:
        assert client.opt_structured_reply().type == Rep.ACK
        start_tls(client, pki.client("alice"))
        final, _ = client.opt_go("disk")
        assert final.type == Rep.ACK
        reply = client.read(0, 4096)
        # Structured replies were agreed in clear text only: now the reply is simple.
        assert [c.kind for c in reply.chunks] == ["simple"]
        assert reply.data() == read_range(image, 0, 4096)


# ------------------------------------------------------------------ certificates refused


@pytest.mark.parametrize("who", ["stranger", "revoked"])
def test_foreign_and_revoked_certificates_are_refused(serve, pki: TestPki, image: Path,
                                                      who: str) -> None:
    """A certificate from another CA, or one the CRL revokes, fails the TLS handshake."""
    require("nbdinfo", "qemu-img")
    server = serve(image, "--export", "disk", "--export-tls", "required", *certs(pki))
    assert run(["nbdinfo", nbds(server, "disk", pki.client(who))]).returncode != 0
    qemu = run(["qemu-img", "info", *qemu_object(pki.client(who)),
                "--image-opts", qemu_opts(server, "disk")])
    assert qemu.returncode != 0
    assert "Our own certificate" not in qemu.stderr, "qemu refused it, not the server"
    out = libnbd(libnbd_connect(
        "h.set_tls(nbd.TLS_REQUIRE)",
        f"h.connect_uri({nbds(server, 'disk', pki.client(who))!r})"))
    assert out["ok"] is False, out
    with raw_client(server) as client:
        start_tls(client, pki.client(who))
        assert refused_by_tls(client)
    # The same server still serves a good certificate.
    run_ok(["nbdinfo", "--size", nbds(server, "disk", pki.client("alice"))])


def test_revoked_certificate_is_accepted_without_the_crl(serve, pki: TestPki,
                                                         image: Path) -> None:
    """The control for the test above: the revoked certificate itself is valid."""
    require("nbdinfo")
    server = serve(image, "--export", "disk", "--export-tls", "required",
                   *certs(pki, crl=False))
    size = run_ok(["nbdinfo", "--size", nbds(server, "disk", pki.client("revoked"))])
    assert int(size) == IMAGE_SIZE


def test_certificate_files_given_one_by_one(serve, pki: TestPki, image: Path) -> None:
    """--tls-cert/--tls-key/--tls-ca/--tls-crl instead of a directory."""
    require("nbdinfo")
    d = pki.server_dir
    server = serve(image, "--export", "disk", "--export-tls", "required",
                   "--tls-cert", d / "server-cert.pem", "--tls-key", d / "server-key.pem",
                   "--tls-ca", d / "ca-cert.pem", "--tls-crl", d / "ca-crl.pem")
    run_ok(["nbdinfo", "--size", nbds(server, "disk", pki.client("alice"))])
    assert run(["nbdinfo", "--size", nbds(server, "disk", pki.client("revoked"))]).returncode
    assert run(["nbdinfo", "--size", nbds(server, "disk", pki.client("stranger"))]).returncode


def test_tls_export_on_a_server_without_tls(serve, image: Path) -> None:
    """No certificates: STARTTLS is refused, and a TLS-only export is out of reach (a
    policy refusal: ERR_TLS_REQD would promise a STARTTLS the server does not offer)."""
    server = serve(image, "--export", "disk", "--export-tls", "required")
    with raw_client(server) as client:
        assert client.option(Opt.STARTTLS)[-1].type == Rep.ERR_POLICY
        final, _ = client.opt_go("disk")
        assert final.type == Rep.ERR_POLICY, final
        assert b"TLS" in final.payload


# ------------------------------------------------------------------ allowed clients


def test_allowed_client_names(serve, pki: TestPki, image: Path) -> None:
    require("nbdinfo", "qemu-img")
    server = serve(image, "--export", "disk", "--export-tls", "required",
                   "--allow-client", "alice", *certs(pki))
    run_ok(["nbdinfo", "--size", nbds(server, "disk", pki.client("alice"))])
    run_ok(["qemu-img", "info", *qemu_object(pki.client("alice")),
            "--image-opts", qemu_opts(server, "disk")])
    assert run(["nbdinfo", "--size", nbds(server, "disk", pki.client("bob"))]).returncode != 0
    assert run(["qemu-img", "info", *qemu_object(pki.client("bob")),
                "--image-opts", qemu_opts(server, "disk")]).returncode != 0
    out = libnbd(libnbd_connect("h.set_tls(nbd.TLS_REQUIRE)",
                                f"h.connect_uri({nbds(server, 'disk', pki.client('bob'))!r})"))
    assert out["ok"] is False
    assert "server policy prevents NBD_OPT_GO" in out["error"], out  # NBD_REP_ERR_POLICY

    for who in ("bob", "anonymous"):  # anonymous: TLS without a client certificate
        with raw_client(server) as client:
            start_tls(client, pki.client(who))
            final, _ = client.opt_go("disk")
            assert final.type == Rep.ERR_POLICY, (who, final)
    with raw_client(server) as client:
        final, _ = client.opt_go("disk")
        assert final.type == Rep.ERR_TLS_REQD, final  # clear text cannot prove a name


def test_allowed_client_names_imply_tls(serve, pki: TestPki, image: Path) -> None:
    """--allow-client on an export whose TLS policy was left optional still needs TLS."""
    server = serve(image, "--export", "disk", "--export-tls", "optional",
                   "--allow-client", "alice", *certs(pki))
    with raw_client(server) as client:
        assert client.opt_go("disk")[0].type == Rep.ERR_TLS_REQD
    with raw_client(server) as client:
        start_tls(client, pki.client("alice"))
        assert client.opt_go("disk")[0].type == Rep.ACK


# ------------------------------------------------------------------ allowed networks


def test_client_outside_the_allowed_networks_is_refused(serve, pki: TestPki,
                                                        image: Path) -> None:
    """A real libnbd client over TLS from 127.0.0.2 (its socket bound there first, since
    libnbd cannot choose a source address) is refused; from 127.0.0.1 it is served."""
    server = serve(image, "--export", "disk", "--export-tls", "required",
                   "--allow-network", "127.0.0.1/32", *certs(pki))

    def from_address(source: str) -> dict:
        setup = (
            "h.set_tls(nbd.TLS_REQUIRE)\n"
            f"h.set_tls_certificates({str(pki.client('alice'))!r})\n"
            "h.set_export_name('disk')\n"
            f"s = socket.socket(); s.bind(({source!r}, 0)); "
            f"s.connect(({server.host!r}, {server.port}))"
        )
        return libnbd(libnbd_connect(setup, "h.connect_socket(s.detach())"))

    outside = from_address("127.0.0.2")
    assert outside["ok"] is False
    assert "server policy prevents NBD_OPT_GO" in outside["error"], outside
    inside = from_address("127.0.0.1")
    assert inside["ok"] is True, inside
    assert inside["tls"] is True
    assert bytes.fromhex(inside["head"]) == read_range(image, 0, 4096)

    # Our own client from 127.0.0.2 sees the exact reply, and no export in LIST.
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.connect((server.host, server.port))
    with NbdClient(sock) as client:
        client.read_greeting()
        client.send_client_flags()
        start_tls(client, pki.client("alice"))
        listed = client.option(Opt.LIST)
        assert [r.type for r in listed] == [Rep.ACK]  # nothing listed
        assert client.opt_go("disk")[0].type == Rep.ERR_POLICY


# ------------------------------------------------------------------ option size cap


@pytest.mark.parametrize("over_tls", [False, True], ids=["clear", "tls"])
def test_oversized_option_is_refused_without_reading_it(serve, pki: TestPki, image: Path,
                                                        over_tls: bool) -> None:
    """An option header claiming more than --max-option-length: the server hangs up at
    once instead of waiting for (or buffering) the payload; it keeps serving others."""
    server = serve(image, "--export", "disk", *certs(pki), "--max-option-length", "4096",
                   "--handshake-timeout", "120")
    for claimed in (4097, 1 << 31):
        with raw_client(server) as client:
            if over_tls:
                start_tls(client, pki.client("alice"))
            client.send_option(Opt.INFO, b"", length=claimed)  # the header alone
            assert client.server_closed(timeout=20), f"still open after claiming {claimed}"
    with raw_client(server) as client:  # just under the cap is an ordinary option
        info = client.info_request("x" * 3000)
        assert len(info) < 4096
        assert client.option(Opt.INFO, info)[-1].type == Rep.ERR_UNKNOWN
    if shutil.which("nbdinfo"):
        run_ok(["nbdinfo", "--size", nbds(server, "disk", pki.client("alice"))])


# ------------------------------------------------------------------ TLS-PSK


def psk_python() -> str | None:
    """A Python 3.13 or newer on this machine, which has the ssl PSK callbacks."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(13, 20)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[3-9]*/bin/python")))
    probe = "import ssl, sys; sys.exit(not hasattr(ssl.SSLContext, 'set_psk_server_callback'))"
    for python in filter(None, candidates):
        if subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    return None


@pytest.fixture
def serve_with() -> Iterator[Callable[..., ServerProcess]]:
    """Like ``serve`` but under another Python: ``serve_with(python, IMAGE, ...)``."""
    started: list[ServerProcess] = []

    def factory(python: str, *args: object) -> ServerProcess:
        cmd = [python, "-m", "nbdcore", "serve", *map(str, args), "--bind", HOST, "--port", "0"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        server = ServerProcess(proc, HOST, int(line.rsplit(":", 1)[1]))
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def test_tls_psk(serve_with, pki: TestPki, image: Path, tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img")
    python = psk_python()
    if python is None:
        pytest.skip("no Python 3.13 or newer here: TLS-PSK needs its ssl PSK callbacks")
    server = serve_with(python, image, "--export", "disk", "--export-tls", "required",
                        "--tls", "required", "--tls-psk-file", pki.psk_file)
    psk_uri = (f"nbds://{pki.psk_identity}@{HOST}:{server.port}/disk"
               f"?tls-psk-file={pki.psk_file}")
    info = run_json(["nbdinfo", "--json", psk_uri])
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    run_ok(["qemu-img", "info", "--object",
            f"tls-creds-psk,id=tls0,endpoint=client,dir={pki.psk_dir},"
            f"username={pki.psk_identity}", "--image-opts", qemu_opts(server, "disk")])
    out = tmp_path / "out.raw"
    run_ok(["nbdcopy", psk_uri, out])
    assert filecmp.cmp(image, out, shallow=False)

    wrong = write_psk_file(tmp_path / "wrong" / "keys.psk", {pki.psk_identity: os.urandom(32)})
    bad_uri = f"nbds://{pki.psk_identity}@{HOST}:{server.port}/disk?tls-psk-file={wrong}"
    assert run(["nbdinfo", "--size", bad_uri]).returncode != 0
    unknown = write_psk_file(tmp_path / "unknown" / "keys.psk", {"mallory": os.urandom(32)})
    assert run(["nbdinfo", "--size", f"nbds://mallory@{HOST}:{server.port}/disk"
                f"?tls-psk-file={unknown}"]).returncode != 0
    run_ok(["nbdinfo", "--size", psk_uri])  # still serving


def test_tls_psk_identity_as_allowed_client(serve_with, pki: TestPki, image: Path) -> None:
    require("nbdinfo")
    python = psk_python()
    if python is None:
        pytest.skip("no Python 3.13 or newer here: TLS-PSK needs its ssl PSK callbacks")
    server = serve_with(python, image, "--export", "disk", "--allow-client", "alice",
                        "--export-tls", "required", "--tls-psk-file", pki.psk_file)
    base = f"{HOST}:{server.port}/disk?tls-psk-file={pki.psk_file}"
    run_ok(["nbdinfo", "--size", f"nbds://alice@{base}"])
    assert run(["nbdinfo", "--size", f"nbds://bob@{base}"]).returncode != 0  # a valid key


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="this Python has TLS-PSK")
def test_tls_psk_file_fails_clearly_without_psk_support(pki: TestPki, image: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbdcore", "serve", str(image), "--tls-psk-file",
         str(pki.psk_file), "--bind", HOST, "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "listening on" not in result.stdout
    message = result.stderr.lower()
    assert "psk" in message, result.stderr
    assert "3.13" in message, result.stderr
    assert "traceback" not in message, result.stderr
