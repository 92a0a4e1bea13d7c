"""`stsmilter run`: the long-running daemon.

Start-up order matters:
1. load the config (a bad one stops here with one line, exit 2);
2. block HUP/TERM/INT/USR1 before any thread exists, so every helper thread inherits
   the mask: libmilter's own signal thread waits for HUP/TERM/INT, ours for USR1;
3. preflight (shared with check-config): as root, create the missing last directories of
   the PID file, sockets and cache for the service user, drop privileges, check access;
4. pidfile, engine (cache loaded from the store), metrics, socketmap, then the milter,
   which runs in the main thread until libmilter sees TERM or INT. With [milter] socket
   empty (socketmap only) no part of the milter starts: the main thread itself waits
   for TERM/INT/HUP (sigwait: blocked in every thread) and stops the same way.
USR1 reloads the configuration: new Milter.factory (each milter connection keeps the
snapshot it started with), new DNS/fetch settings; the cache stays.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys
import threading
from typing import Optional

from stsmilter import __version__, config as config_mod
from stsmilter.service import preflight
from stsmilter.service.pidfile import Pidfile
from stsmilter.service.preflight import StartupError
from stsmilter.threads import block_signals

log = logging.getLogger("stsmilter")

SYSLOG_SOCKET = "/dev/log"


def setup_logging(daemon_cfg) -> None:
    """Log to syslog (facility mail) or stderr. Without a working syslog socket
    (containers, chroots) lines go to stderr, and the first one says why: never lost."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler, problem = None, None
    if daemon_cfg.log == "syslog":
        handler, problem = _syslog_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s stsmilter[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(daemon_cfg.log_level.upper())
    if problem:
        log.warning("log = syslog, but %s: logging to standard error", problem)


def _syslog_handler():
    """(handler, None), or (None, why syslog cannot be used)."""
    if not os.path.exists(SYSLOG_SOCKET):
        return None, f"no {SYSLOG_SOCKET}"
    # SysLogHandler hides a failed connect until the first line; find out now.
    problem = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(SYSLOG_SOCKET)
                break
            except OSError as e:
                problem = problem or f"{SYSLOG_SOCKET}: {e.strerror or e}"
    else:
        return None, problem
    handler = _SyslogHandler(SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL)
    handler.setFormatter(logging.Formatter(f"stsmilter[{os.getpid()}]: %(message)s"))
    return handler, None


class _SyslogHandler(logging.handlers.SysLogHandler):
    """A line syslog refuses later (syslogd stopped) goes to stderr, not into a traceback."""

    def handleError(self, record):
        try:
            sys.stderr.write(f"syslog unreachable: {self.format(record)}\n")
            sys.stderr.flush()
        except Exception:
            super().handleError(record)


def import_everything(cfg=None) -> None:
    """Import every module the daemon will use before privileges are dropped: the
    service user may not be able to read the Python installation or the checkout it
    runs from (a venv under /root), and Python imports lazily (codecs included).
    tests/world/late_imports.py reports whatever a run still imports after the drop.
    With [cache] redis, redis-py too, and a client built once (it imports on first use);
    a redis-py that is missing is reported by preflight.check_access()."""
    import codecs
    import importlib

    for name in (
        "stsmilter.engine", "stsmilter.engine.decision", "stsmilter.engine.mxtls_checker", "stsmilter.milter.session",
        "stsmilter.socketmap.server",
        "stsmilter.milter.stop", "stsmilter.milter.wake", "stsmilter.milter.shed", "stsmilter.service.metrics_server",
        "stsmilter.service.open_files", "stsmilter.service.control", "resource", "ctypes", "select", "ipaddress",
        "h11", "dns.asyncresolver", "dns.asyncquery", "dns._asyncio_backend",
        "prometheus_client", "Milter", "sqlite3", "ssl", "http.client", "json", "asyncio",
        "concurrent.futures.thread", "idna", "encodings.idna",
        "idna.uts46data",  # loaded by the first U-label's UTS 46 mapping
    ):
        importlib.import_module(name)
    # IDNA 2008 labels go through the punycode codec (LookupError once it cannot load).
    for codec in ("ascii", "latin-1", "utf-8", "idna", "punycode"):
        codecs.lookup(codec)
    # dnspython imports an rdata class per (class, type) on first sight, whatever the
    # server sends: load them all and turn that off (an unknown type parses as generic).
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    if hasattr(dns.rdata, "load_all_types"):
        dns.rdata.load_all_types(disable_dynamic_load=True)
    else:  # Debian 12's dnspython 2.3: the same loading; a type it has no class for stays generic
        for rdtype in dns.rdatatype.RdataType:
            dns.rdata.get_rdata_class(dns.rdataclass.IN, rdtype)
    if cfg is not None and cfg.cache.redis:
        try:
            from stsmilter.engine.store import redis as _redis_store, redis_client  # noqa: F401 (the store, now)
        except ImportError:
            return
        redis_client.prepare(cfg.cache.redis, cfg.cache.redis_timeout)


class Daemon:
    def __init__(self, cfg, config_path: Optional[str]) -> None:
        self.cfg = cfg
        self.started = cfg  # the keys in _RESTART_KEYS keep these values until a restart
        self.config_path = config_path
        self.discovery = None
        self.socketmap = None
        self.metrics_server = None
        self.control = None
        self.milter_started = False
        self.reload_thread_id = 0

    def start_services(self) -> None:
        from stsmilter.service import control, open_files
        from stsmilter import engine

        socketmap_room = open_files.ensure(self.cfg)  # before anything opens descriptors
        self.discovery = engine.open_engine(self.cfg)
        self.discovery.start_refresher()
        control_path = control.control_path(self.cfg.daemon.pidfile)
        if control_path:
            self.control = control.ControlServer(control_path, self.discovery.cache)
            try:
                self.control.start()
            except OSError as e:
                self.control = None
                raise StartupError(f"[daemon] pidfile = {self.cfg.daemon.pidfile}: control socket {control_path}:"
                                   f" {e.strerror or e}") from None
        listen = self.cfg.metrics.listen
        if listen is not None:
            from stsmilter.service.metrics_server import MetricsServer

            self.metrics_server = MetricsServer(listen.host, listen.port)
            try:
                self.metrics_server.start()
            except OSError as e:
                self.metrics_server = None
                raise StartupError(f"{self.cfg.where('metrics', 'listen')}: [metrics] listen {listen}: {e.strerror or e}") from None
        if self.cfg.socketmap.listen is not None:
            from stsmilter.socketmap.server import SocketmapServer

            self.socketmap = SocketmapServer(self.discovery, self.cfg.socketmap, maps=self.cfg.maps)
            self.socketmap.connection_limit = socketmap_room
            try:
                self.socketmap.start()
            except OSError as e:
                raise StartupError(f"{self.cfg.where('socketmap', 'listen')}: [socketmap] listen {self.cfg.socketmap.listen}: {e}") from None

    def install_milter(self, cfg) -> None:
        import Milter

        from stsmilter.engine.decision import Decider
        from stsmilter.milter.session import make_milter_class

        Milter.factory = make_milter_class(Decider(self.discovery, cfg.milter, cfg.scope), cfg)

    def reload(self) -> None:
        from stsmilter import engine

        try:
            new = config_mod.load(self.config_path)
            # First: it refuses what check-config refuses ([fetch] ca_file) before it changes anything.
            engine.reconfigure(self.discovery, new)
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        restart_needed = [
            f"[{section}] {key}"
            for section, key, value in new.items()
            if (section, key) in _RESTART_KEYS and value != getattr(getattr(self.started, section), key)
        ]
        setup_logging(new.daemon)
        if self.started.milter.socket:  # a milter added by a reload waits for a restart
            self.install_milter(new)
        if self.socketmap is not None:
            self.socketmap.update(self.discovery, new.socketmap, new.maps)
        self.cfg = new
        if restart_needed:
            log.warning("changes to %s take effect only after a restart", ", ".join(restart_needed))
        log.info("configuration reloaded from %s", new.source)

    def wait_for_reloads(self) -> None:
        ready = threading.Event()

        def loop() -> None:
            self.reload_thread_id = threading.get_native_id()
            ready.set()
            while True:
                signal.sigwait({signal.SIGUSR1})
                try:
                    self.reload()
                except Exception:
                    log.exception("reload failed")

        threading.Thread(target=loop, name="sts-reload", daemon=True).start()
        ready.wait(5)

    def serve_without_milter(self) -> None:
        """[milter] socket is empty: no libmilter, and none of the threads that look after
        it (milter/stop.py, wake.py, shed.py). The main thread waits for a stop signal
        itself; USR1 stays the reload thread's."""
        log.info("stsmilter %s: no milter ([milter] socket is empty); socketmap on %s", __version__,
                 self.cfg.socketmap.listen)
        signum = signal.sigwait({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        log.info("%s received", signal.Signals(signum).name)

    def serve_milter(self) -> None:
        import Milter

        from stsmilter.milter.negotiation import MILTER_FLAGS
        from stsmilter.milter.session import log_untrapped_exception

        Milter.set_flags(MILTER_FLAGS)
        sys.excepthook = log_untrapped_exception  # what pymilter cannot hand to a callback
        milter_cfg = self.cfg.milter
        # libmilter creates a unix socket under the process umask: make it socket_mode.
        os.umask(0o777 & ~milter_cfg.socket_mode)
        log.info("stsmilter %s: milter on %s", __version__, milter_cfg.socket)
        self.milter_started = True
        from stsmilter.milter import shed, stop, wake

        stop.start_watcher(milter_cfg.socket, ours={self.reload_thread_id})
        wake.start_waker(milter_cfg.socket)
        shed.start_guard(milter_cfg.socket)  # finds the listener once runmilter opens it
        try:
            Milter.runmilter("stsmilter", milter_cfg.socket, timeout=milter_cfg.timeout)
        except Milter.milter.error as e:
            raise StartupError(f"{self.cfg.where('milter', 'socket')}: [milter] socket {milter_cfg.socket}: {e}") from None

    def stop(self) -> None:
        socket_spec = self.started.milter.socket
        if self.milter_started and socket_spec.startswith(("unix:", "local:")):
            path = socket_spec.split(":", 1)[1]
            try:  # libmilter leaves its socket file behind
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        if self.socketmap is not None:
            self.socketmap.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.control is not None:
            self.control.stop()
        if self.discovery is not None:
            self.discovery.close()
            self.discovery.cache.close()


# Keys read only at start-up.
_RESTART_KEYS = {
    ("daemon", "user"),
    ("daemon", "group"),
    ("daemon", "pidfile"),
    ("milter", "socket"),
    ("milter", "socket_mode"),
    ("milter", "timeout"),
    ("cache", "path"),
    ("cache", "max_entries"),
    ("cache", "negative_ttl"),
    ("cache", "failure_backoff"),
    ("cache", "dns_failure_ttl"),
    ("cache", "redis"),
    ("cache", "redis_prefix"),
    ("cache", "redis_timeout"),
    ("dns", "max_concurrent"),
    ("fetch", "max_concurrent"),
    ("probe", "max_concurrent"),
    ("socketmap", "listen"),
    ("socketmap", "socket_mode"),
    ("socketmap", "max_connections"),
    ("metrics", "listen"),
}


def run(config_path: Optional[str]) -> int:
    cfg = config_mod.load(config_path)  # ConfigError -> one line, exit 2 (cli)
    setup_logging(cfg.daemon)
    block_signals()
    daemon = Daemon(cfg, config_path)
    pidfile = Pidfile(cfg.daemon.pidfile)
    started = False
    try:
        preflight.enter_service_identity(cfg, create=True, before_drop=lambda: import_everything(cfg))
        pidfile.write()
        started = True
        daemon.start_services()
        # What start-up built (imported modules, the policies loaded from the store) lives
        # as long as the process: out of the garbage collector's way, so that a full
        # collection, which holds every thread, scans only what came since.
        gc.freeze()
        if cfg.milter.socket:
            daemon.install_milter(cfg)
        daemon.wait_for_reloads()
        if cfg.milter.socket:
            daemon.serve_milter()
        else:
            daemon.serve_without_milter()
        log.info("stopping")
        return 0
    except (StartupError, config_mod.ConfigError) as e:
        log.error("cannot start: %s", e)
        if not any(isinstance(h, logging.StreamHandler) and h.stream is sys.stderr for h in logging.getLogger().handlers):
            print(f"stsmilter: cannot start: {e}", file=sys.stderr)
        return 2
    finally:
        daemon.stop()
        if started:
            pidfile.remove()
