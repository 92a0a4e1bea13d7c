"""`stsmilter import-config FILE.yml`: a postfix-mta-sts-resolver configuration
(/etc/mta-sts-daemon.yml, its keys as of version 1.5.1) printed as an equivalent
stsmilter.conf.

What it converts (README "Migrating from postfix-mta-sts-resolver" says why):

* ``host``/``port`` or ``path``/``mode``: ``[socketmap] listen``/``socket_mode``; no milter
  (``[milter] socket =`` empty: the peer is a socketmap only);
* ``default_zone``: ``[socketmap]`` (``strict_testing``, ``timeout`` as ``lookup_timeout``,
  ``tlsrpt``); each of ``zones``: a ``[socketmap NAME]`` section with every value the
  peer gives that zone (its own, else the peer's defaults, not default_zone's);
* ``cache``: ``[cache]`` (``internal``: ``max_entries``; ``sqlite``: stsmilter's own file,
  never the peer's; ``redis``: ``redis`` and ``redis_timeout``);
* ``proactive_policy_fetching``: ``[cache] refresh_interval``; ``cache_grace``:
  ``[cache] id_check_interval``;
* the rest (``shutdown_timeout``, ``reuse_port``, ``require_sni``, Sentinel, PostgreSQL,
  option keys without an equivalent) becomes a comment, and so does every key the peer
  does not know either, which is also named on stderr: nothing is dropped silently.

PyYAML is imported here only (Debian: python3-yaml); the daemon never needs it.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

from stsmilter import __version__, config as config_mod
from stsmilter.cli.common import EXIT_OK, UsageError

# postfix-mta-sts-resolver 1.5.1's defaults (postfix_mta_sts_resolver/defaults.py)
PEER_HOST, PEER_PORT = "127.0.0.1", 8461
PEER_TIMEOUT = 4
PEER_CACHE_GRACE = 60
PEER_CACHE_SIZE = 10000
PEER_REFRESH_INTERVAL = 86400

TOP_KEYS = ("host", "port", "path", "mode", "reuse_port", "shutdown_timeout", "cache_grace", "cache",
            "default_zone", "zones", "proactive_policy_fetching")
ZONE_KEYS = ("strict_testing", "timeout", "require_sni", "tlsrpt")
FETCHING_KEYS = ("enabled", "interval", "concurrency_limit", "grace_ratio")
CACHE_TYPES = ("internal", "sqlite", "redis", "redis_sentinel", "postgres")
STSMILTER_CACHE = config_mod.SCHEMA["cache"]["path"][1]


class _Converted:
    """The sections of the stsmilter.conf being written, comments and keys in order,
    and the warnings for stderr."""

    def __init__(self, source: str):
        self.source = source
        self.sections: Dict[str, List[str]] = {}
        self.warnings: List[str] = []

    def key(self, section: str, key: str, value: str, comment: str = "") -> None:
        lines = self.sections.setdefault(section, [])
        if comment:
            lines.extend(_comment(comment))
        lines.append(f"{key} = {value}".rstrip())

    def note(self, section: str, text: str) -> None:
        self.sections.setdefault(section, []).extend(_comment(text))

    def unknown(self, section: str, where: str, value: Any) -> None:
        """A key the peer does not know either: a comment, and a warning on stderr."""
        self.note(section, f"{where} = {_show(value)}: not a postfix-mta-sts-resolver key; not converted")
        self.warnings.append(f"{self.source}: {where}: unknown key, not converted")

    def text(self) -> str:
        out = [f"# stsmilter.conf converted by stsmilter import-config {__version__} from {self.source}",
               "# (postfix-mta-sts-resolver). Check it with: stsmilter check-config -c FILE",
               "# Every other key has its default: see stsmilter.conf(5) and etc/stsmilter.conf.",
               ""]
        for section, lines in self.sections.items():
            out.append(f"[{section}]")
            out.extend(lines)
            out.append("")
        return "\n".join(out)


def _comment(text: str) -> List[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > 88 and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    lines.append(line)
    return lines


def _show(value: Any) -> str:
    """A YAML value on one comment line (passwords in options stay out of the output)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 and "\n" not in text else text.replace("\n", " ")[:57] + "..."


class _Bad(Exception):
    """A value no stsmilter key can take; str(): 'where: expected ...'."""


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        try:
            value = float(str(value).strip())
        except ValueError:
            raise _Bad(f"{where} = {_show(value)}: expected a number") from None
    return float(value)


def _seconds(value: Any, where: str, lo: float, hi: float, out: _Converted, section: str, key: str,
             comment: str) -> None:
    """key = value clamped to [lo, hi] (a comment says so when clamped)."""
    number = _number(value, where)
    clamped = min(max(number, lo), hi)
    text = config_mod.plain_number(clamped)
    if clamped != number:
        comment += f" The peer's {where} = {_show(value)} is outside stsmilter's {config_mod.plain_number(lo)}" \
                   f" to {config_mod.plain_number(hi)}: {text}."
    out.key(section, key, text, comment)


def _truth(value: Any, where: str, out: _Converted) -> bool:
    """The peer tests these values for truth; a YAML boolean is what it documents."""
    if not isinstance(value, bool):
        out.warnings.append(f"{out.source}: {where} = {_show(value)}: not a boolean; taken as"
                            f" {'yes' if value else 'no'}, as postfix-mta-sts-resolver does")
    return bool(value)


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{where}: expected a mapping")
    return {str(k): v for k, v in value.items()}


# --------------------------------------------------------------------------- sections


def _listen(cfg: Dict[str, Any], out: _Converted, listen: Optional[str]) -> None:
    out.key("milter", "socket", "", "postfix-mta-sts-resolver is a socketmap only: no milter. Set a socket"
            " (e.g. inet:8894@127.0.0.1) to add the milter's submission-time checks (README).")
    path = cfg.get("path")
    if listen is not None:
        address = listen
        why = "From --listen."
    elif path is not None:
        address = f"unix:{path}"
        why = "From path."
    else:
        host = str(cfg.get("host", PEER_HOST))
        port = cfg.get("port", PEER_PORT)
        if isinstance(port, bool) or not isinstance(port, int):
            try:
                port = int(str(port), 10)
            except ValueError:
                raise _Bad(f"port = {_show(port)}: expected a whole number from 1 to 65535") from None
        address = f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"
        why = "From host and port."
    try:
        config_mod.parse_listen(address)
    except ValueError as e:
        raise _Bad(f"{'path' if path is not None and listen is None else 'host/port'}: {address}: expected {e}") from None
    out.key("socketmap", "listen", address, why + " In Postfix: smtp_tls_policy_maps ="
            f" socketmap:{address.replace('[', '').replace(']', '') if address.startswith('inet:') else address}:postfix"
            " (any map name: the zones below are map names too).")
    if path is not None and listen is None and "mode" in cfg:
        mode = cfg["mode"]
        if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777:
            text = f"{mode:04o}"  # YAML reads 0666 as an octal number
        elif isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode.strip()):
            text = mode.strip().rjust(4, "0")
        else:
            raise _Bad(f"mode = {_show(mode)}: expected an octal file mode such as 0666")
        out.key("socketmap", "socket_mode", text, "From mode.")
    elif "mode" in cfg:
        out.note("socketmap", f"mode = {_show(cfg['mode'])}: the peer uses it only with path; not converted.")


def _zone(zone: Dict[str, Any], where: str, section: str, out: _Converted, default: bool) -> None:
    """default_zone into [socketmap], or a zone into [socketmap NAME] with every value the
    peer gives it (a zone does not inherit default_zone's values in the peer)."""
    for key in zone:
        if key not in ZONE_KEYS:
            out.unknown(section, f"{where}.{key}", zone[key])
    strict = _truth(zone.get("strict_testing", False), f"{where}.strict_testing", out)
    out.key(section, "strict_testing", "yes" if strict else "no",
            f"From {where}.strict_testing." + (" yes answers testing policies like enforce ones, against"
                                               " RFC 8461." if strict else ""))
    _seconds(zone.get("timeout", PEER_TIMEOUT), f"{where}.timeout", 0.05, 60, out, section, "lookup_timeout",
             f"From {where}.timeout" + (": how long a lookup may take before on_timeout applies. The peer"
                                        " bounded each DNS query and the fetch by it and then answered"
                                        " NOTFOUND; stsmilter's lookup goes on ([dns] timeout, [fetch]"
                                        " timeout) and fills the cache for the MTA's next attempt."
                                        if default else " (the peer's default is 4, not default_zone's)."))
    tlsrpt = _truth(zone.get("tlsrpt", False), f"{where}.tlsrpt", out)
    out.key(section, "tlsrpt", "yes" if tlsrpt else "no", f"From {where}.tlsrpt (Postfix 3.10 and later).")
    if not _truth(zone.get("require_sni", True), f"{where}.require_sni", out):
        out.note(section, f"{where}.require_sni = false: no equivalent; stsmilter always asks Postfix to send"
                 " SNI (servername=hostname), as MX hosts serving several names need.")
    if default:
        out.note(section, "on_timeout = temp (the default): a first lookup slower than lookup_timeout defers"
                 " the mail (Postfix retries; the policy is cached by then), where the peer answered NOTFOUND"
                 " and Postfix sent it at its default TLS level. on_timeout = notfound does what the peer did.")
        out.note(section, "dane = auto (the default): DANE first (RFC 8461 section 2) for domains whose MX"
                 " hosts have DNSSEC-validated TLSA records (needs a validating [dns] resolver); the peer"
                 " has no DANE. dane = no gives the peer's answers.")


def _zones(value: Any, out: _Converted) -> None:
    for name, zone in _mapping(value, "zones").items():
        where = f"zones.{name}"
        if not config_mod.schema.MAP_NAME.fullmatch(name):
            out.note("socketmap", f"{where}: not a map name stsmilter accepts ({config_mod.schema.MAP_NAME_FORM});"
                     " not converted.")
            out.warnings.append(f"{out.source}: {where}: not a map name stsmilter accepts; not converted")
            continue
        _zone(_mapping(zone, where), where, f"{config_mod.MAP_SECTION} {name}", out, default=False)


def _cache(value: Any, cfg: Dict[str, Any], out: _Converted) -> None:
    cache = _mapping(value, "cache")
    for key in cache:
        if key not in ("type", "options"):
            out.unknown("cache", f"cache.{key}", cache[key])
    kind = str(cache.get("type", "internal"))
    options = _mapping(cache.get("options"), "cache.options")
    used: Tuple[str, ...] = ()
    if kind == "internal":
        used = ("cache_size",)
        size = int(_number(options.get("cache_size", PEER_CACHE_SIZE), "cache.options.cache_size"))
        entries = min(max(size, 100), 10_000_000)
        out.key("cache", "max_entries", str(entries), "From cache.options.cache_size (internal: memory only)."
                + (f" The peer's {size} is outside 100 to 10000000." if entries != size else ""))
        out.key("cache", "path", STSMILTER_CACHE, "The peer kept policies in memory only; stsmilter also keeps"
                " them in this file across restarts (empty: memory only, as the peer).")
    elif kind == "sqlite":
        used = ("filename", "threads", "timeout")
        out.key("cache", "path", STSMILTER_CACHE, f"The peer's cache.options.filename ="
                f" {_show(options.get('filename'))} is another format and is left alone (stsmilter would"
                " move a foreign file aside): stsmilter keeps its own file and discovers policies afresh.")
        for key in ("threads", "timeout"):
            if key in options:
                out.note("cache", f"cache.options.{key} = {_show(options[key])}: no equivalent (one file,"
                         " store threads of its own); not converted.")
    elif kind == "redis":
        used = ("url", "socket_timeout", "socket_connect_timeout", "max_connections")
        url = str(options.get("url", ""))
        if not url:
            raise _Bad("cache.options.url: missing (the peer needs it for type redis)")
        try:
            config_mod.SCHEMA["cache"]["redis"][0](url)
        except ValueError as e:
            raise _Bad(f"cache.options.url = {_show(url)}: expected {e}") from None
        out.key("cache", "redis", url, "From cache.options.url: several daemons share this Redis (README"
                " \"Several MTAs\"); needs redis-py (Debian: python3-redis). The peer's keys (bare domain"
                " names) and stsmilter's (under redis_prefix) do not meet.")
        if "socket_timeout" in options:
            _seconds(options["socket_timeout"], "cache.options.socket_timeout", 0.05, 10, out, "cache",
                     "redis_timeout", "From cache.options.socket_timeout: the most any Redis call may take"
                     " before the daemon goes on without it.")
        for key in ("socket_connect_timeout", "max_connections"):
            if key in options:
                out.note("cache", f"cache.options.{key} = {_show(options[key])}: no equivalent (redis_timeout"
                         " bounds connecting too; at most 8 connections per daemon); not converted.")
    elif kind in ("redis_sentinel", "postgres"):
        used = tuple(options)
        what = {"redis_sentinel": "Redis Sentinel cannot be named (README \"Several MTAs\": give the daemons"
                                  " an address that follows the master and set [cache] redis to it)",
                "postgres": "no PostgreSQL store"}[kind]
        out.key("cache", "path", STSMILTER_CACHE, f"cache.type = {kind}: {what}; this file instead.")
        out.note("cache", f"cache.options ({', '.join(sorted(options)) or 'none'}): not converted.")
        out.warnings.append(f"{out.source}: cache.type = {kind}: no equivalent; [cache] path, a local file, instead")
    else:
        raise _Bad(f"cache.type = {_show(kind)}: expected one of {', '.join(CACHE_TYPES)}")
    for key, option in options.items():
        if key not in used:
            if kind == "redis":  # the peer passes any other option to redis-py
                out.note("cache", f"cache.options.{key}: a redis-py option without an equivalent here (put"
                         " credentials and TLS in the URL); not converted.")
                out.warnings.append(f"{out.source}: cache.options.{key}: not converted")
            else:
                out.unknown("cache", f"cache.options.{key}", option)
    grace = cfg.get("cache_grace", PEER_CACHE_GRACE)
    seconds = _number(grace, "cache_grace")
    _seconds(grace, "cache_grace", 0, 86400, out, "cache", "id_check_interval",
             "From cache_grace: a cached policy's TXT id is checked again after at most this long (sooner"
             " when the record's TTL is shorter).")
    if seconds < 60:
        _seconds(grace, "cache_grace", 0, 86400, out, "cache", "id_check_min_interval",
                 "From cache_grace too: not sooner than this, however short the TTL.")


def _fetching(value: Any, out: _Converted) -> None:
    fetching = _mapping(value, "proactive_policy_fetching")
    for key in fetching:
        if key not in FETCHING_KEYS:
            out.unknown("cache", f"proactive_policy_fetching.{key}", fetching[key])
    enabled = _truth(fetching.get("enabled", False), "proactive_policy_fetching.enabled", out)
    interval = fetching.get("interval", PEER_REFRESH_INTERVAL)
    if enabled:
        _seconds(interval, "proactive_policy_fetching.interval", 60, 31557600, out, "cache", "refresh_interval",
                 "From proactive_policy_fetching.interval: each cached policy is fetched again this often"
                 " (at half its max_age if that comes first).")
    else:
        out.note("cache", "proactive_policy_fetching is off in the peer; stsmilter always refreshes cached"
                 " policies in the background (RFC 8461 section 10.2), every refresh_interval (86400).")
    for key in ("concurrency_limit", "grace_ratio"):
        if key in fetching:
            out.note("cache", f"proactive_policy_fetching.{key} = {_show(fetching[key])}: no equivalent"
                     " ([fetch] max_concurrent bounds every fetch; each policy is refreshed on its own"
                     " schedule); not converted.")


def convert(text: str, source: str = "<yaml>", listen: Optional[str] = None) -> Tuple[str, List[str]]:
    """(stsmilter.conf text, warnings) for a postfix-mta-sts-resolver configuration.
    UsageError (one line) for a file that is not such a configuration."""
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"import-config: {source}{line}: not YAML: {problem}") from None
    out = _Converted(source)
    try:
        cfg = _mapping(cfg, "the file")
        _listen(cfg, out, listen)
        _zone(_mapping(cfg.get("default_zone"), "default_zone"), "default_zone", "socketmap", out, default=True)
        _zones(cfg.get("zones"), out)
        _cache(cfg.get("cache"), cfg, out)
        _fetching(cfg.get("proactive_policy_fetching"), out)
    except _Bad as e:
        raise UsageError(f"import-config: {source}: {e}") from None
    if "reuse_port" in cfg:
        out.note("socketmap", f"reuse_port = {_show(cfg['reuse_port'])}: no equivalent; one daemon listens, and"
                 " several daemons share their policies through [cache] redis instead.")
    if "shutdown_timeout" in cfg:
        out.note("socketmap", f"shutdown_timeout = {_show(cfg['shutdown_timeout'])}: no equivalent; stsmilter"
                 " stops within a second and Postfix asks again on a new connection.")
    for key in cfg:
        if key not in TOP_KEYS:
            out.unknown("socketmap", key, cfg[key])
    result = out.text()
    config_mod.loads(result, "<import-config output>")  # a bug here, not the operator's: fails loudly
    return result, out.warnings


def cmd_import_config(args) -> int:
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise UsageError("import-config: needs PyYAML (Debian: python3-yaml; pip: stsmilter[yaml])") from None
    if args.listen is not None:
        try:
            config_mod.parse_listen(args.listen)
        except ValueError as e:
            raise UsageError(f"import-config: --listen {args.listen}: expected {e}") from None
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"import-config: {args.file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    result, warnings = convert(text, args.file, args.listen)
    for warning in warnings:
        print(f"stsmilter: warning: {warning}", file=sys.stderr)
    sys.stdout.write(result)
    return EXIT_OK
