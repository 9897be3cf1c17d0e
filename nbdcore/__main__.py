"""``python -m nbdcore serve IMAGE [--export NAME] ...``: a standalone NBD server.

Like ``qemu-nbd`` or ``nbdkit file``: serves raw (sparse) image files. Several images may
be given, each followed by its own ``--export``/``--description``/``--read-only`` and
access policy (``--export-tls``, ``--allow-client``, ``--allow-network``,
``--export-max-connections``); an image without ``--export`` is the default export "".
The first line printed on stdout is ``listening on HOST:PORT`` (useful with ``--port 0``).

TLS: ``--tls-certificates DIR`` takes nbdkit's and qemu's layout (ca-cert.pem,
server-cert.pem, server-key.pem, ca-crl.pem); ``--tls`` picks the server-wide mode.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

from .backends import SparseFile
from .exports import TLS_POLICIES, Export, ExportRegistry
from .protocol.constants import DEFAULT_PORT
from .protocol.handshake import MAX_OPTION_LENGTH, TLS_MODES
from .server import SPIN_US, NbdServer
from .tls import TlsConfigError, TlsSettings, server_context


@dataclass
class _ImageSpec:
    path: str
    export: str | None = None
    description: str = ""
    read_only: bool = False
    tls: str = "off"
    max_connections: str = "0"
    allowed_clients: list[str] = field(default_factory=list)
    allowed_networks: list[str] = field(default_factory=list)


# Options that belong to the IMAGE written before them, and whether they take a value.
_IMAGE_OPTIONS = {
    "--export": "export", "-x": "export",
    "--description": "description", "-D": "description",
    "--read-only": "read_only", "-r": "read_only",
    "--export-tls": "tls",
    "--export-max-connections": "max_connections",
    "--allow-client": "allowed_clients",
    "--allow-network": "allowed_networks",
}
# Server-wide options that take a value (the others are switches).
_VALUE_OPTIONS = {
    "--bind", "-b", "--port", "-p", "--handshake-timeout", "--max-connections", "--workers", "-w",
    "--tls", "--tls-certificates", "--tls-cert", "--tls-key", "--tls-ca", "--tls-crl",
    "--tls-psk-file", "--max-option-length", "--spin-us", "--sendfile",
}


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``serve`` sub-parser."""
    parser = argparse.ArgumentParser(prog="python -m nbdcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve raw image files over NBD",
                           usage="%(prog)s IMAGE [--export NAME] [--description TEXT] "
                                 "[--read-only] [IMAGE ...] [options]")
    image = serve.add_argument_group("each IMAGE (options apply to the IMAGE before them)")
    image.add_argument("images", metavar="IMAGE", nargs="*", help="raw image file")
    image.add_argument("--export", "-x", metavar="NAME", help="export name (default \"\")")
    image.add_argument("--description", "-D", metavar="TEXT", help="export description")
    image.add_argument("--read-only", "-r", action="store_true", help="serve it read-only")
    image.add_argument("--export-tls", choices=TLS_POLICIES, default="off",
                       help="required: only clients that started TLS (default off)")
    image.add_argument("--allow-client", metavar="NAME", action="append",
                       help="only TLS clients whose certificate CN/DNS name or PSK identity "
                            "is NAME (repeatable)")
    image.add_argument("--allow-network", metavar="CIDR", action="append",
                       help="only clients from this network (repeatable)")
    image.add_argument("--export-max-connections", metavar="N", type=int, default=0,
                       help="clients of this export at once (default no limit)")
    serve.add_argument("--bind", "-b", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", "-p", type=int, default=DEFAULT_PORT,
                       help="TCP port (0 picks a free one)")
    serve.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="drop clients that have not finished negotiating by then")
    serve.add_argument("--max-connections", type=int, default=1024,
                       help="connections at once; more are closed at accept")
    serve.add_argument("--max-option-length", type=int, default=MAX_OPTION_LENGTH,
                       metavar="BYTES", help="longest option payload a client may send")
    tls = serve.add_argument_group("TLS")
    tls.add_argument("--tls", choices=TLS_MODES, default=None,
                     help="off: refuse STARTTLS; optional: clients choose; required: "
                          "nothing but STARTTLS before TLS (default optional with "
                          "certificates or PSK, else off)")
    tls.add_argument("--tls-certificates", metavar="DIR",
                     help="directory with server-cert.pem, server-key.pem and optionally "
                          "ca-cert.pem (verify client certificates) and ca-crl.pem")
    tls.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    tls.add_argument("--tls-ca", metavar="FILE", help="CA that signs client certificates")
    tls.add_argument("--tls-crl", metavar="FILE", help="revoked client certificates (PEM CRL)")
    tls.add_argument("--tls-psk-file", metavar="FILE",
                     help="identity:hexkey lines for TLS-PSK (Python 3.13 or newer)")
    serve.add_argument("--no-multi-conn", action="store_true",
                       help="do not advertise NBD_FLAG_CAN_MULTI_CONN")
    serve.add_argument("--workers", "-w", type=int, default=1, metavar="N",
                       help="serve from N processes sharing the port (spreads many "
                            "connections over the cores)")
    serve.add_argument("--sendfile", choices=("alone", "always", "never"), default="alone",
                       help="when large reads go out with sendfile instead of from the "
                            "file's mapping: while a connection is the server's only one "
                            "(the default), always, or never")
    serve.add_argument("--no-splice", action="store_true",
                       help="copy large WRITE payloads through a buffer instead of "
                            "splicing them from the socket into the file (to measure it)")
    serve.add_argument("--spin-us", type=int, default=SPIN_US, metavar="US",
                       help="how long an idle connection polls for the next request "
                            "before sleeping, while at most 2 connections are open "
                            f"(default {SPIN_US}; 0: never)")
    serve.add_argument("--verbose", "-v", action="count", default=0)
    return parser, serve


def _split_images(
    serve: argparse.ArgumentParser, words: list[str]
) -> tuple[list[_ImageSpec], list[str]]:
    """Group IMAGE words with the per-image options after them; return the rest."""
    images: list[_ImageSpec] = []
    rest: list[str] = []
    words = list(words)
    while words:
        word = words.pop(0)
        name, eq, inline = word.partition("=")
        if name in _IMAGE_OPTIONS:
            if not images:
                serve.error(f"{name} must follow the IMAGE it applies to")
            field_name = _IMAGE_OPTIONS[name]
            if field_name == "read_only":
                images[-1].read_only = True
                continue
            if not eq:
                if not words:
                    serve.error(f"{name} needs a value")
                inline = words.pop(0)
            current = getattr(images[-1], field_name)
            if isinstance(current, list):
                current.append(inline)
            else:
                setattr(images[-1], field_name, inline)
        elif word.startswith("-") and word != "-":
            rest.append(word)
            if name in _VALUE_OPTIONS and not eq and words:
                rest.append(words.pop(0))
        else:
            images.append(_ImageSpec(path=word))
    return images, rest


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser, serve = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] != "serve":
        return parser.parse_args(words)  # prints the usage error or help
    images, rest = _split_images(serve, words[1:])
    args = serve.parse_args(rest)
    args.images = images
    if not images:
        serve.error("give at least one IMAGE")
    names = [spec.export if spec.export is not None else "" for spec in images]
    if len(set(names)) != len(names):
        serve.error("every IMAGE needs its own export name (only one may be the default \"\")")
    for spec in images:
        _check_image_policy(serve, spec)
    args.tls_context = _tls_context(serve, args)
    return args


def _check_image_policy(serve: argparse.ArgumentParser, spec: _ImageSpec) -> None:
    if spec.tls not in TLS_POLICIES:
        serve.error(f"--export-tls must be one of {', '.join(TLS_POLICIES)}")
    try:
        if int(spec.max_connections) < 0:
            raise ValueError
    except ValueError:
        serve.error("--export-max-connections needs a number >= 0")
    for network in spec.allowed_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            serve.error(f"--allow-network {network!r} is not a network (like 10.0.0.0/8)")


def _tls_context(serve: argparse.ArgumentParser, args: argparse.Namespace) -> object:
    if args.tls_certificates:
        settings = TlsSettings.from_directory(args.tls_certificates, args.tls_psk_file)
    else:
        settings = TlsSettings(cert_file=args.tls_cert, key_file=args.tls_key,
                               ca_file=args.tls_ca, crl_file=args.tls_crl,
                               psk_file=args.tls_psk_file)
    if settings.cert_file and not settings.key_file:
        serve.error("--tls-cert needs --tls-key")
    if not settings.cert_file and not settings.psk_file:
        if args.tls not in (None, "off"):
            serve.error(f"--tls {args.tls} needs --tls-certificates, --tls-cert/--tls-key "
                        "or --tls-psk-file")
        return None
    if args.tls == "off":
        return None
    try:
        return server_context(settings)
    except TlsConfigError as exc:
        serve.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=(logging.DEBUG if args.verbose > 1
               else logging.INFO if args.verbose else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Handlers go in before anything is announced, so a signal never finds the default.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.workers <= 1:
        return _serve(args, args.port, stop, announce=True)
    return _serve_in_processes(args, stop)


def _serve(args: argparse.Namespace, port: int, stop: threading.Event, *,
           announce: bool) -> int:
    """One engine process: open the images, listen, serve until ``stop``."""
    several = args.workers > 1
    registry = ExportRegistry()
    for spec in args.images:
        try:
            backend = SparseFile(spec.path, read_only=spec.read_only,
                                 cache_allocation=not several)
        except OSError as exc:
            print(f"nbdcore: cannot open {spec.path}: {exc.strerror}", file=sys.stderr)
            return 1
        registry.add(Export(
            name=spec.export if spec.export is not None else "",
            backend=backend,
            description=spec.description,
            read_only=spec.read_only,
            multi_conn=not args.no_multi_conn,
            tls=spec.tls,
            allowed_clients=spec.allowed_clients,
            allowed_networks=[ipaddress.ip_network(n, strict=False)
                              for n in spec.allowed_networks],
            max_connections=int(spec.max_connections),
        ))
    server = NbdServer(registry, host=args.bind, port=port,
                       handshake_timeout_s=args.handshake_timeout,
                       max_connections=args.max_connections,
                       use_sendfile=args.sendfile == "always",
                       sendfile_alone=args.sendfile == "alone",
                       use_splice=not args.no_splice, spin_us=args.spin_us,
                       reuse_port=several, tls_context=args.tls_context,
                       tls_mode=args.tls if args.tls_context is not None else "off",
                       max_option_length=args.max_option_length)
    try:
        host, bound = server.start()
    except OSError as exc:
        print(f"nbdcore: cannot listen on {args.bind}:{port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    if announce:
        print(f"listening on {host}:{bound}", flush=True)
    # Not a bare wait(): the handler's set() can land between wait() reading the flag and
    # going to sleep (the handler runs in this very thread), and that wake-up is lost.
    while not stop.wait(0.2):
        pass
    server.shutdown()
    for name in registry.names():
        registry.get(name).backend.close()
    return 0


def _serve_in_processes(args: argparse.Namespace, stop: threading.Event) -> int:
    """--workers N: N processes share the port (SO_REUSEPORT), so that connections spread
    over the cores instead of sharing one interpreter lock. The files are shared through
    the page cache, so a FLUSH in any process covers every process's writes (multi-conn
    holds); the allocation cache is off since another process may punch holes."""
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)  # fixes the port for every process
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        probe.bind((args.bind, args.port))
    except OSError as exc:
        print(f"nbdcore: cannot listen on {args.bind}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    port = probe.getsockname()[1]
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()  # before any thread exists in this process
        if pid == 0:
            probe.close()
            os._exit(_serve(args, port, stop, announce=False))
        children.append(pid)
    try:
        return _serve(args, port, _stop_with_children(stop, children), announce=True)
    finally:
        probe.close()
        remaining = list(children)
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in remaining:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # already reaped by the watcher


def _stop_with_children(stop: threading.Event, children: list[int]) -> threading.Event:
    """``stop``, also set when a worker process dies: the server then ends as a whole."""

    def watch() -> None:
        while not stop.is_set():
            for pid in list(children):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.remove(pid)
                    print(f"nbdcore: worker process {pid} exited; stopping", file=sys.stderr)
                    stop.set()
                    return
            stop.wait(0.5)

    threading.Thread(target=watch, name="nbd-workers", daemon=True).start()
    return stop


if __name__ == "__main__":
    sys.exit(main())
