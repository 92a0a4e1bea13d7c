"""The configuration's schema: every section and key, with its type and its default.

Each key is declared once in SCHEMA as (converter, default as written in the file);
etc/stsmilter.conf and stsmilter.conf(5) document the same keys (a test keeps the three
in step). A converter takes the raw string and returns the typed value, or raises
ValueError whose text is the expected form (the loader, config/__init__.py, puts it in
a ConfigError naming the file and line).
"""

import dataclasses
import ipaddress
import re
from typing import Any, Callable, Dict, Optional, Tuple

# --- value converters: each takes the raw string and returns the typed value or raises
# ValueError whose text is the expected form.


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError("yes or no")


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise ValueError(f"a whole number from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"a whole number from {lo} to {hi}")
        return value

    return convert


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    expected = f"a number of seconds from {plain_number(lo)} to {plain_number(hi)}"

    def convert(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(expected) from None
        if not lo <= value <= hi:
            raise ValueError(expected)
        return value

    return convert


def plain_number(number: float) -> str:
    """31557600, 0.05: as an administrator writes it (not 3.15576e+07, not 5.0)."""
    return str(int(number)) if float(number).is_integer() else str(number)


def _choice(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return convert


def _text(raw: str) -> str:
    return raw.strip()


def _words(raw: str) -> Tuple[str, ...]:
    """Comma- and/or space-separated list."""
    return tuple(w for w in re.split(r"[\s,]+", raw.strip()) if w)


def _domains(raw: str) -> Tuple[str, ...]:
    return tuple(w.lower().rstrip(".") for w in _words(raw))


def _networks(raw: str) -> Tuple[Any, ...]:
    nets = []
    for word in _words(raw):
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError("a list of IP networks such as 127.0.0.0/8, ::1/128") from None
    return tuple(nets)


def _addresses(raw: str) -> Tuple[str, ...]:
    addrs = []
    for word in _words(raw):
        try:
            addrs.append(str(ipaddress.ip_address(word)))
        except ValueError:
            raise ValueError("a list of IP addresses such as 127.0.0.1, ::1") from None
    return tuple(addrs)


def _mode(raw: str) -> int:
    value = raw.strip()
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError("an octal file mode such as 0660")
    return int(value, 8)


_MILTER_SOCKET = re.compile(r"(unix|local):/.+|inet6?:\d{1,5}(@.+)?")


def _milter_socket(raw: str) -> str:
    """libmilter's form; empty: no milter (the daemon serves the socketmap only)."""
    value = raw.strip()
    if not value:
        return ""
    if not _MILTER_SOCKET.fullmatch(value):
        raise ValueError("inet:PORT@HOST, inet6:PORT@HOST or unix:/PATH (or empty: no milter)")
    if value.startswith("inet"):
        port = int(value.split(":", 1)[1].split("@", 1)[0])
        if not 1 <= port <= 65535:
            raise ValueError("inet:PORT@HOST with PORT from 1 to 65535")
    return value


@dataclasses.dataclass(frozen=True)
class Listen:
    """A listening endpoint: family is 'inet' (host, port) or 'unix' (path)."""

    family: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return "unix:" + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


def parse_listen(raw: str, unix_ok: bool = True) -> Optional[Listen]:
    """'HOST:PORT', 'inet:HOST:PORT', '[::1]:PORT' or 'unix:/PATH'; empty means disabled."""
    value = raw.strip()
    if not value:
        return None
    form = "inet:HOST:PORT or unix:/PATH" if unix_ok else "HOST:PORT"
    if value.startswith("unix:"):
        if unix_ok and value[5:].startswith("/"):
            return Listen("unix", path=value[5:])
        raise ValueError(form)
    if value.startswith("inet:"):
        value = value[5:]
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if not m:
        raise ValueError(form)
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(form + " with PORT from 1 to 65535")
    return Listen("inet", host=host, port=port)


def _listen(raw: str) -> Optional[Listen]:
    return parse_listen(raw, unix_ok=True)


def _http_listen(raw: str) -> Optional[Listen]:
    return parse_listen(raw, unix_ok=False)


_HELO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]")


def is_helo_name(value: str) -> bool:
    """A name an SMTP client may send in EHLO: a host name or an address literal."""
    return _HELO_NAME.fullmatch(value) is not None


def _helo_name(raw: str) -> str:
    """A host name (or address literal) to send in EHLO; empty: this host's name."""
    value = raw.strip()
    if value and not is_helo_name(value):
        raise ValueError("a host name such as mail.example.com, an address literal such as [192.0.2.1], or empty")
    return value


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(raw: str) -> str:
    """A URL redis-py's from_url() accepts (checked here by form only: redis-py is imported
    only when the key is set); empty: no Redis."""
    value = raw.strip()
    if not value:
        return ""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in _REDIS_SCHEMES or not rest or any(c.isspace() for c in value):
        raise ValueError("redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH (or empty)")
    return value


def _redis_prefix(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9:._{}-]{1,64}", value):
        raise ValueError("1 to 64 letters, digits or :._{}-")
    return value


# --- the schema: section -> key -> (converter, default as written in the file)

SCHEMA: Dict[str, Dict[str, Tuple[Callable[[str], Any], str]]] = {
    "daemon": {
        "user": (_text, "stsmilter"),
        "group": (_text, "stsmilter"),
        "pidfile": (_text, "/run/stsmilter/stsmilter.pid"),
        "log": (_choice("syslog", "stderr"), "syslog"),
        "log_level": (_choice("debug", "info", "warning", "error"), "info"),
    },
    "milter": {
        "socket": (_milter_socket, "inet:8894@127.0.0.1"),
        "socket_mode": (_mode, "0660"),
        "timeout": (_int(1, 3600), "600"),
        "lookup_timeout": (_seconds(0.05, 60), "5"),
        "on_pending": (_choice("accept", "tempfail"), "accept"),
        "on_violation": (_choice("tempfail", "reject", "hold"), "tempfail"),
        "dry_run": (_bool, "no"),
        "non_smtp": (_choice("accept", "hold"), "accept"),
    },
    "scope": {
        "trusted_networks": (_networks, "127.0.0.0/8, ::1/128"),
        "daemon_names": (_words, ""),
        "local_domains": (_domains, ""),
        "skip_mailers": (_words, "local, virtual, lmtp, error, discard"),
    },
    "dns": {
        "nameservers": (_addresses, ""),
        "port": (_int(1, 65535), "53"),
        "timeout": (_seconds(0.1, 60), "5"),
        "max_concurrent": (_int(1, 65536), "2048"),
    },
    "fetch": {
        "timeout": (_seconds(0.1, 120), "10"),
        "port": (_int(1, 65535), "443"),
        "ca_file": (_text, ""),
        "allow_private_addresses": (_bool, "no"),
        "max_concurrent": (_int(1, 4096), "1024"),
    },
    "probe": {
        "enabled": (_bool, "no"),
        "port": (_int(1, 65535), "25"),
        "helo_name": (_helo_name, ""),
        "timeout": (_seconds(1, 120), "10"),
        "ttl": (_seconds(60, 86400), "3600"),
        "failure_ttl": (_seconds(10, 86400), "300"),
        "ca_file": (_text, ""),
        "max_concurrent": (_int(1, 4096), "64"),
    },
    "cache": {
        "path": (_text, "/var/lib/stsmilter/cache.sqlite"),
        "max_entries": (_int(100, 10_000_000), "200000"),
        "negative_ttl": (_seconds(0, 86400), "300"),
        "failure_backoff": (_seconds(0, 86400), "300"),
        "dns_failure_ttl": (_seconds(0, 3600), "60"),
        "id_check_interval": (_seconds(0, 86400), "300"),
        "id_check_min_interval": (_seconds(0, 86400), "60"),
        "refresh_interval": (_seconds(60, 31557600), "86400"),
        "mx_ttl": (_seconds(0, 86400), "300"),
        "redis": (_redis_url, ""),
        "redis_prefix": (_redis_prefix, "stsmilter:"),
        "redis_timeout": (_seconds(0.05, 10), "0.5"),
    },
    "socketmap": {
        "listen": (_listen, "inet:127.0.0.1:8461"),
        "socket_mode": (_mode, "0660"),
        "lookup_timeout": (_seconds(0.05, 60), "5"),
        "on_timeout": (_choice("temp", "notfound"), "temp"),
        "strict_testing": (_bool, "no"),
        "tlsrpt": (_bool, "no"),
        "dane": (_choice("auto", "no"), "auto"),
        "max_connections": (_int(1, 100_000), "1000"),
        "request_timeout": (_seconds(0.1, 3600), "10"),
    },
    "metrics": {
        "listen": (_http_listen, "127.0.0.1:9464"),
    },
}


# --- per-map sections: [socketmap NAME] overrides these [socketmap] keys for requests
# whose map name (Postfix: socketmap:inet:HOST:PORT:NAME) is NAME; other names get
# [socketmap]'s values. Converters and defaults are [socketmap]'s.

MAP_SECTION = "socketmap"
MAP_KEYS = ("strict_testing", "lookup_timeout", "on_timeout", "dane", "tlsrpt")
MAP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAP_NAME_FORM = "1 to 64 letters, digits or _.- (the map name the MTA asks for)"


def map_section_name(section: str) -> Optional[str]:
    """'socketmap strict' -> 'strict' (whatever the spaces); None for any other section.
    ValueError (MAP_NAME_FORM) for a [socketmap ...] header whose name is not a map name."""
    head, _, name = section.strip().partition(" ")
    if head != MAP_SECTION or not name.strip():
        return None
    name = name.strip()
    if not MAP_NAME.fullmatch(name):
        raise ValueError(MAP_NAME_FORM)
    return name
