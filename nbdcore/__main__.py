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
from dataclasses import dataclass

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


# Options that belong to the IMAGE written before them, and whether they take a value.
_IMAGE_OPTIONS = {
    "--export": "export", "-x": "export",
    "--description": "description", "-D": "description",
    "--read-only": "read_only", "-r": "read_only",
}
# Server-wide options that take a value (the others are switches).
_VALUE_OPTIONS = {"--bind", "-b", "--port", "-p", "--handshake-timeout", "--max-connections"}


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
    serve.add_argument("--bind", "-b", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", "-p", type=int, default=DEFAULT_PORT,
                       help="TCP port (0 picks a free one)")
    serve.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="drop clients that have not finished negotiating by then")
    serve.add_argument("--max-connections", type=int, default=1024)
    serve.add_argument("--no-multi-conn", action="store_true",
                       help="do not advertise NBD_FLAG_CAN_MULTI_CONN")
    serve.add_argument("--sendfile", action="store_true",
                       help="send large reads with sendfile (cheaper for this server, "
                            "dearer for a receiver on the same machine)")
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
    return args


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
                       max_connections=args.max_connections, use_sendfile=args.sendfile)
    try:
        host, port = server.start()
    except OSError as exc:
        print(f"nbdcore: cannot listen on {args.bind}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    print(f"listening on {host}:{port}", flush=True)
    stop.wait()
    server.shutdown()
    for name in registry.names():
        registry.get(name).backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
