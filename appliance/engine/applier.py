"""Turn an EngineSpec into the running engine's exports and TLS, touching only what changed."""

from __future__ import annotations

import ipaddress
import logging
import ssl

from nbdcore import tls as nbdtls
from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.exports import Client
from nbdcore.server import NbdServer
from nbdcore.stats import ConnectionInfo

from .spec import EngineSpec, ExportSpec, TlsSpec

log = logging.getLogger(__name__)


class SpecApplier:
    """Keeps ``registry`` equal to the last spec applied.

    - an export that is new gets a backend and is published;
    - one whose file, read-only flag or multi-conn changed is re-published with a new
      backend and its clients are disconnected (they negotiated the old flags);
    - one whose allowed networks, TLS policy, allowed client names, connection limit or
      description changed keeps its backend, and only the clients the new policy refuses
      are disconnected (clear-text clients of an export that now requires TLS, TLS clients
      whose names are no longer listed);
    - one that was disabled stays known (clients get NBD_REP_ERR_POLICY) but its clients
      are disconnected; one that is gone (deleted) is withdrawn likewise.
    Backends of withdrawn exports are closed once no connection uses them.

    TLS: a new version of the files (a rotated certificate, a new CRL) or a new mode gives
    the server a new context for new connections; connected clients keep their sessions,
    except those the new mode refuses and those whose certificate was revoked. A context
    that cannot be built leaves the old one in place and is reported in ``failed["tls"]``
    (the runner retries); if TLS is required and none ever loaded, every client is refused
    rather than served in clear text.
    """

    def __init__(self, server: NbdServer, registry: ExportRegistry) -> None:
        self.server = server
        self.registry = registry
        self.current: dict[str, tuple[ExportSpec, Export]] = {}
        self.retired: list[Export] = []
        # export name (or "tls") -> why it could not be published (or loaded)
        self.failed: dict[str, str] = {}
        self.digest = ""
        self.tls_mode = "off"  # what the server does now
        self.tls_version = ""
        self.tls_warning = ""  # e.g. PSK identities this Python cannot serve
        self._tls_applied: tuple[object, ...] | None = None
        self._context: ssl.SSLContext | None = None  # the last context that loaded

    def apply(self, spec: EngineSpec) -> None:
        wanted = {e.name: e for e in spec.exports}
        for name in list(self.current):
            if name not in wanted:
                self._withdraw(name)
        self.failed = {}
        mode_changed = self._apply_tls(spec.tls)
        for name, export_spec in wanted.items():
            old = self.current.get(name)
            if old is None:
                self._publish(export_spec)
            elif old[0] != export_spec:
                self._change(old, export_spec)
        if mode_changed:
            dropped = self.server.close_connections(self._refused_now)
            if dropped:
                log.info("TLS mode %s: %d client(s) no longer allowed", self.tls_mode, dropped)
        if spec.tls is not None and spec.tls.revoked_serials:
            self._close_revoked(frozenset(spec.tls.revoked_serials))
        self.digest = spec.digest
        self.close_retired()

    # ------------------------------------------------------------ TLS

    def _apply_tls(self, spec: TlsSpec | None) -> bool:
        """Give the server the context and mode of ``spec``; True if the mode changed."""
        if spec is None or spec.mode == "off":
            wanted: tuple[object, ...] = ("off",)
        else:
            wanted = (spec.mode, spec.version, spec.cert_file, spec.key_file, spec.ca_file,
                      spec.crl_file, spec.psk_file)
        if wanted == self._tls_applied:
            return False
        old_mode = self.tls_mode
        if spec is None or spec.mode == "off":
            self.server.set_tls(None, "off")
            self._context, self.tls_mode, self.tls_version = None, "off", ""
            self.tls_warning = ""
        else:
            try:
                context = nbdtls.server_context(self._tls_settings(spec))
            except Exception as exc:  # a bad file must not stop the exports being served
                self.failed["tls"] = f"cannot load the TLS files (version {spec.version}): {exc}"
                log.error("TLS not updated, the previous context stays: %s", self.failed["tls"])
                return self._fail_closed(spec)
            self.server.set_tls(context, spec.mode)
            self._context, self.tls_mode, self.tls_version = context, spec.mode, spec.version
        self._tls_applied = wanted
        log.info("TLS %s%s", self.tls_mode,
                 f" (version {self.tls_version})" if self.tls_version else "")
        return self.tls_mode != old_mode

    def _fail_closed(self, spec: TlsSpec) -> bool:
        """TLS now required but the new files do not load: require it with the previous
        context, or, if there is none, with one that has no certificate (every TLS
        handshake fails) rather than serve in clear text what must not be."""
        if spec.mode != "required" or self.tls_mode == "required":
            return False
        context = self._context or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.set_tls(context, "required")
        self.tls_mode = "required"
        log.error("TLS required: %s", "with the previous certificates" if self._context
                  else "no certificate loads, so every client is refused until one does")
        return True

    def _tls_settings(self, spec: TlsSpec) -> nbdtls.TlsSettings:
        psk_file = spec.psk_file
        self.tls_warning = ""
        if psk_file and not nbdtls.PSK_SUPPORTED:
            # Certificates still work: serve them, and say why PSK clients will fail.
            self.tls_warning = ("PSK identities are configured but this engine's Python "
                                "has no TLS-PSK support (3.13 or newer needed)")
            log.warning("%s; serving certificates only", self.tls_warning)
            psk_file = None
        return nbdtls.TlsSettings(cert_file=spec.cert_file, key_file=spec.key_file,
                                  ca_file=spec.ca_file, crl_file=spec.crl_file,
                                  psk_file=psk_file)

    def _close_revoked(self, serials: frozenset[int]) -> None:
        dropped = self.server.close_connections(
            lambda info: info.tls_serial is not None and info.tls_serial in serials)
        if dropped:
            log.info("%d client(s) with a revoked certificate disconnected", dropped)

    def _admits(self, export: Export, info: ConnectionInfo) -> bool:
        """Whether a connected client would still be let in by ``export`` now."""
        if self.tls_mode == "required" and not info.tls:
            return False
        if self.tls_mode == "off" and export.needs_tls():
            return False  # a server without TLS cannot serve it any more
        return export.admits(Client(info.peer, tls=info.tls, names=tuple(info.tls_names)))

    def _refused_now(self, info: ConnectionInfo) -> bool:
        entry = self.current.get(info.export_name or "")
        return entry is not None and not self._admits(entry[1], info)

    def _change(self, old: tuple[ExportSpec, Export], new: ExportSpec) -> None:
        old_spec, old_export = old
        same_backend = (old_spec.path, old_spec.size, old_spec.read_only,
                        old_spec.multi_conn) == (new.path, new.size, new.read_only,
                                                 new.multi_conn)
        if not same_backend:
            self._withdraw(new.name)
            self._publish(new)
            return
        export = self._export(new, old_export.backend)
        self.registry.add(export)
        self.current[new.name] = (new, export)
        dropped = self.server.close_connections(
            lambda info: info.export_name == new.name and not self._admits(export, info))
        log.info("export %r: policy updated, %d client(s) no longer allowed", new.name, dropped)

    def _publish(self, spec: ExportSpec) -> None:
        try:
            backend = SparseFile(spec.path, read_only=spec.read_only)
        except OSError as exc:
            self.failed[spec.name] = f"cannot open {spec.path}: {exc.strerror}"
            log.error("export %r not published: %s", spec.name, self.failed[spec.name])
            return
        export = self._export(spec, backend)
        self.registry.add(export)
        self.current[spec.name] = (spec, export)
        log.info("export %r published (%s%s)", spec.name, spec.path,
                 ", read-only" if spec.read_only else "")

    def _withdraw(self, name: str) -> None:
        self.registry.remove(name)
        _, export = self.current.pop(name)
        dropped = self.server.close_connections(lambda info: info.export_name == name)
        self.retired.append(export)
        log.info("export %r withdrawn, %d client(s) disconnected", name, dropped)

    def close_retired(self) -> None:
        if not self.retired:
            return
        in_use = {id(e.backend) for e in self.server.exports_in_use()}
        live = {id(export.backend) for _, export in self.current.values()}
        keep = []
        for export in self.retired:
            backend_id = id(export.backend)
            if backend_id in in_use or backend_id in live:
                keep.append(export)
            else:
                export.backend.close()
        self.retired = keep

    def close_all(self) -> None:
        for _, export in self.current.values():
            export.backend.close()
        for export in self.retired:
            export.backend.close()
        self.current.clear()
        self.retired.clear()

    @staticmethod
    def _export(spec: ExportSpec, backend: SparseFile) -> Export:
        return Export(
            name=spec.name,
            backend=backend,
            description=spec.description,
            read_only=spec.read_only,
            multi_conn=spec.multi_conn,
            enabled=spec.enabled,
            allowed_networks=[ipaddress.ip_network(n, strict=False)
                              for n in spec.allowed_networks],
            tls=spec.tls,
            allowed_clients=list(spec.allowed_clients),
            max_connections=spec.max_connections,
            hidden=spec.hidden,
        )
