"""``python -m nbdcore serve IMAGE [--export NAME] ...``: a standalone NBD server.

Like ``qemu-nbd`` or ``nbdkit file``: serves raw (sparse) image files. Several images may
be given, each followed by its own ``--export``/``--description``/``--read-only``;
an image without ``--export`` is the default export "". The first line printed on
stdout is ``listening on HOST:PORT`` (useful with ``--port 0``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field

from .backends import SparseFile
from .exports import Export, ExportRegistry
from .protocol.constants import DEFAULT_PORT
from .server import NbdServer


@dataclass
class _ImageSpec:
    path: str
    export: str | None = None
    description: str = ""
    read_only: bool = False
    extra: dict[str, str] = field(default_factory=dict)


class _ImageOption(argparse.Action):
    """Per-image options attach to the IMAGE given most recently."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        images: list[_ImageSpec] = namespace.images
        if not images:
            parser.error(f"{option_string} must follow the IMAGE it applies to")
        spec = images[-1]
        if self.dest == "read_only":
            spec.read_only = True
        else:
            setattr(spec, self.dest, values)


class _Image(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        namespace.images.append(_ImageSpec(path=values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbdcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve raw image files over NBD")
    serve.set_defaults(images=[])
    serve.add_argument("image", metavar="IMAGE", action=_Image, nargs="?",
                       help="raw image file (repeatable, each with its own options)")
    serve.add_argument("--export", "-x", action=_ImageOption, help="export name of the IMAGE")
    serve.add_argument("--description", "-D", action=_ImageOption, help="export description")
    serve.add_argument("--read-only", "-r", action=_ImageOption, nargs=0,
                       help="serve the IMAGE read-only")
    serve.add_argument("--bind", "-b", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", "-p", type=int, default=DEFAULT_PORT,
                       help="TCP port (0 picks a free one)")
    serve.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="drop clients that have not finished negotiating by then")
    serve.add_argument("--max-connections", type=int, default=1024)
    serve.add_argument("--no-multi-conn", action="store_true",
                       help="do not advertise NBD_FLAG_CAN_MULTI_CONN")
    serve.add_argument("--verbose", "-v", action="count", default=0)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # argparse takes one positional; the remaining IMAGE words come back in ``rest``.
    while rest:
        word = rest.pop(0)
        if word.startswith("-"):
            parser.error(f"unrecognized argument {word}")
        args.images.append(_ImageSpec(path=word))
        args, rest = parser.parse_known_args(rest, namespace=args)
    if not args.images:
        parser.error("give at least one IMAGE")
    names = [spec.export if spec.export is not None else "" for spec in args.images]
    if len(set(names)) != len(names):
        parser.error("every IMAGE needs its own export name (only one may be the default \"\")")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    registry = ExportRegistry()
    for spec in args.images:
        try:
            backend = SparseFile(spec.path, read_only=spec.read_only)
        except OSError as exc:
            print(f"nbdcore: cannot open {spec.path}: {exc.strerror}", file=sys.stderr)
            return 1
        registry.add(Export(
            name=spec.export if spec.export is not None else "",
            backend=backend,
            description=spec.description,
            read_only=spec.read_only,
            multi_conn=not args.no_multi_conn,
        ))
    server = NbdServer(registry, host=args.bind, port=args.port,
                       handshake_timeout_s=args.handshake_timeout,
                       max_connections=args.max_connections)
    try:
        host, port = server.start()
    except OSError as exc:
        print(f"nbdcore: cannot listen on {args.bind}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    print(f"listening on {host}:{port}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    for name in registry.names():
        registry.get(name).backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
