"""What `stsmilter run` checks and prepares before it serves, shared with `check-config`
and the one-shot commands, so that they refuse exactly what `run` refuses.

The daemon starts as root, so nothing here may be turned against root:
- only the LAST directory of a PID file, unix socket or cache path is ever created, and
  only when its parent exists (a typo is an error naming the key, not a new tree);
- a directory is chowned (to [daemon] user/group, mode 0750) only when we have just
  created it, through a descriptor opened without following symlinks; a directory
  that already exists is used as it is, whoever owns it;
- no existing file is chowned or chmodded: a symlink where a socket would be is
  refused with one line; the PID file is replaced by rename, which never follows a
  symlink (pidfile.py); a symlink as the cache file (or its -wal/-shm) is no reason to
  stop the mail: the store refuses to follow it and the daemon serves from memory
  (store/files.py), which check-config reports as a warning (cache_warning());
- everything after the directories happens as the service user: the cache file is
  always created by that user, also by a root `stsmilter query`, which drops to the
  same user first.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import stat
from typing import Callable, FrozenSet, Iterable, List, Optional

SOCKET, PIDFILE, CACHE, FETCH = "socket", "pidfile", "cache", "fetch"
EVERYTHING = frozenset((SOCKET, PIDFILE, CACHE, FETCH))
DIRECTORY_MODE = 0o750
MAX_SOCKET_PATH = 107  # bytes: sockaddr_un's sun_path holds 108 with the final NUL


class StartupError(Exception):
    """The daemon cannot start; str() is one line for the operator."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """The [daemon] user and group a root start switches to."""

    uid: int
    gid: int
    name: str


@dataclasses.dataclass(frozen=True)
class RuntimePath:
    """A file the daemon creates, with the config key that names it."""

    kind: str  # SOCKET, PIDFILE or CACHE
    key: str  # e.g. "/etc/stsmilter/stsmilter.conf:12: [milter] socket = unix:/run/stsmilter/milter.sock"
    path: str

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def service_identity(daemon_cfg, where: Callable[[str], str] = lambda key: "") -> Optional[Identity]:
    """Who to become: None when not root or when no user is configured. where(key): the
    'FILE:LINE: ' of a [daemon] key, for the error line."""
    if os.geteuid() != 0 or not daemon_cfg.user:
        return None
    try:
        user = pwd.getpwnam(daemon_cfg.user)
    except KeyError:
        raise StartupError(f"{where('user')}[daemon] user {daemon_cfg.user!r}: no such user") from None
    gid = user.pw_gid
    if daemon_cfg.group:
        try:
            gid = grp.getgrnam(daemon_cfg.group).gr_gid
        except KeyError:
            raise StartupError(f"{where('group')}[daemon] group {daemon_cfg.group!r}: no such group") from None
    return Identity(user.pw_uid, gid, user.pw_name)


def runtime_paths(cfg, kinds: Iterable[str] = EVERYTHING) -> List[RuntimePath]:
    def key(section: str, name: str, value, note: str = "") -> str:
        return f"{_where(cfg, section, name)}[{section}] {name} = {value}{note}"

    paths = []
    if SOCKET in kinds:
        if cfg.milter.socket.startswith(("unix:", "local:")):
            paths.append(RuntimePath(SOCKET, key("milter", "socket", cfg.milter.socket), cfg.milter.socket.split(":", 1)[1]))
        if cfg.socketmap.listen is not None and cfg.socketmap.listen.family == "unix":
            paths.append(RuntimePath(SOCKET, key("socketmap", "listen", cfg.socketmap.listen), cfg.socketmap.listen.path))
    if PIDFILE in kinds and cfg.daemon.pidfile:
        paths.append(RuntimePath(PIDFILE, key("daemon", "pidfile", cfg.daemon.pidfile), cfg.daemon.pidfile))
    if SOCKET in kinds and cfg.daemon.pidfile:  # the cache control socket beside it (control.py)
        control = _control_path(cfg.daemon.pidfile)
        paths.append(RuntimePath(SOCKET, key("daemon", "pidfile", cfg.daemon.pidfile, f" (control socket {control})"), control))
    if CACHE in kinds and cfg.cache.path and cfg.cache.path != ":memory:" and not cfg.cache.redis:
        paths.append(RuntimePath(CACHE, key("cache", "path", cfg.cache.path), cfg.cache.path))
    return paths


def _where(cfg, section: str, name: str) -> str:
    """'FILE:LINE: ' naming where the key is set, as a configuration error does (empty for
    a Config without a source, such as a test's hand-made one)."""
    where = getattr(cfg, "where", None)
    return f"{where(section, name)}: " if where is not None else ""


def _control_path(pidfile: str) -> str:
    from stsmilter.service.control import control_path

    return control_path(pidfile)


def _lstat(item: RuntimePath, path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # e.g. a directory this user may not search
        raise StartupError(f"{item.key}: {_who()} cannot look at {path}: {e.strerror}") from None


def _check_file(item: RuntimePath) -> None:
    """Refuse what must not be followed or replaced where the file itself will be."""
    if item.kind == SOCKET:
        st = _lstat(item, item.path)
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise StartupError(f"{item.key}: {item.path} exists and is {what}; remove it")
    elif item.kind == PIDFILE:
        st = _lstat(item, item.path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise StartupError(f"{item.key}: {item.path} is a directory")


def plan(cfg, kinds: Iterable[str] = EVERYTHING) -> List[str]:
    """Check every runtime path; return the directories that would have to be created
    (each the last component of its path, under an existing parent)."""
    missing: List[str] = []
    for item in runtime_paths(cfg, kinds):
        if item.kind == SOCKET and len(os.fsencode(item.path)) > MAX_SOCKET_PATH:
            raise StartupError(f"{item.key}: {item.path} is longer than a unix socket path can be"
                               f" ({len(os.fsencode(item.path))} bytes, at most {MAX_SOCKET_PATH})")
        directory = item.directory
        if os.path.isdir(directory):  # an existing directory, or a symlink to one: used as it is
            _check_file(item)
            continue
        if os.path.lexists(directory):
            raise StartupError(f"{item.key}: {directory} is not a directory")
        parent = os.path.dirname(directory)
        if not os.path.isdir(parent):
            raise StartupError(f"{item.key}: {parent} does not exist (only the last directory is created)")
        if directory not in missing:
            missing.append(directory)
    return missing


def _make_directory(directory: str, identity: Optional[Identity]) -> bool:
    """mkdir the last component; give it to identity, mode 0750. False if it appeared
    meanwhile (then it is somebody else's and stays as it is)."""
    parent, name = os.path.split(directory)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, DIRECTORY_MODE, dir_fd=parent_fd)
        except FileExistsError:
            return False
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            # Only a directory we own can be the one we just made: if anyone swapped
            # another in, it is theirs, and we must not give it away.
            if os.fstat(fd).st_uid != os.geteuid():
                raise StartupError(f"{directory} was replaced while being created")
            os.fchmod(fd, DIRECTORY_MODE)  # whatever the umask
            if identity is not None:
                os.fchown(fd, identity.uid, identity.gid)
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)
    return True


def prepare(cfg, identity: Optional[Identity], create: bool = True, kinds: Iterable[str] = EVERYTHING) -> FrozenSet[str]:
    """plan(), then (create) make the missing directories. Returns them: they are ours,
    so check_access() does not ask whether the service user may write in them."""
    missing = plan(cfg, kinds)
    if create:
        for directory in missing:
            try:
                _make_directory(directory, identity)
            except OSError as e:
                raise StartupError(f"cannot create {directory}: {e.strerror}") from None
        # The files inside are checked again now that their directories exist.
        plan(cfg, kinds)
    return frozenset(missing)


def drop_privileges(identity: Optional[Identity]) -> None:
    if identity is None:
        return
    os.setgroups([])
    os.initgroups(identity.name, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)


def _who() -> str:
    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f"uid {os.geteuid()}"


def check_access(cfg, ours: FrozenSet[str] = frozenset(), kinds: Iterable[str] = EVERYTHING) -> None:
    """As the user that will serve: can it create its sockets and PID file, and read
    [fetch] ca_file and [probe] ca_file? (An unusable cache is not fatal: the cache
    degrades instead.)"""
    for item in runtime_paths(cfg, kinds):
        if item.kind == CACHE or item.directory in ours:
            continue
        if not os.access(item.directory, os.W_OK | os.X_OK):
            raise StartupError(f"{item.key}: {_who()} cannot create files in {item.directory}")
    if CACHE in kinds and cfg.cache.redis:
        try:
            import redis  # noqa: F401 (an optional dependency, imported only when used)
        except ImportError:
            raise StartupError(f"{_where(cfg, 'cache', 'redis')}[cache] redis: needs redis-py (Debian: python3-redis; pip: stsmilter[redis])") from None
    if FETCH in kinds:
        from stsmilter import engine  # ConfigError naming [fetch] ca_file if unusable

        engine.make_fetcher(cfg, engine.make_resolver(cfg))
        if cfg.probe.enabled:  # ConfigError naming [probe] ca_file
            engine.probe_context(cfg)


def cache_warning(cfg) -> Optional[str]:
    """Why `run` would keep policies in memory only instead of using the cache file (a
    symlink as the file or its -wal/-shm, something that is not a regular file), as far
    as lstat tells, as the current user; None if nothing is wrong. The store's own check
    (run logs the same reason), so check-config can say what run will do."""
    from stsmilter.engine.store import StoreError
    from stsmilter.engine.store.files import check_files

    for item in runtime_paths(cfg, {CACHE}):
        try:
            check_files(item.path)
        except StoreError as e:
            return f"cache {item.path}: {e}; run starts without it and keeps policies in memory only"
    return None


def enter_service_identity(
    cfg, create: bool, kinds: Iterable[str] = EVERYTHING, before_drop: Callable[[], None] = lambda: None
) -> FrozenSet[str]:
    """The whole sequence `run` follows, for `run` (create=True), `check-config`
    (create=False: nothing is created, the same things are refused) and the one-shot
    commands (only what they use)."""
    kinds = frozenset(kinds)
    identity = service_identity(cfg.daemon, where=lambda key: _where(cfg, "daemon", key))
    ours = prepare(cfg, identity, create, kinds)
    if identity is not None:
        before_drop()  # e.g. import what the service user may not be able to read
    drop_privileges(identity)
    check_access(cfg, ours, kinds)
    return ours
