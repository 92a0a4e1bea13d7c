"""The `stsmilter` command: run, query, check, check-config, cache list|purge.

Exit status: 0 when the command could answer, 2 for usage and configuration errors
(one line on stderr), 1 for anything else that went wrong, 141 (128 + SIGPIPE, quietly)
when the reader of the output went away, as in `stsmilter cache list | head -1`.

Run as root, the commands that use the cache or the network first become [daemon] user,
exactly as `run` does (preflight.py), so a cache file is never created root-owned.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import List, Optional

from stsmilter import __version__, config as config_mod

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141


class UsageError(Exception):
    """str() is the line after "stsmilter: " (every error line carries that prefix once)."""


class CommandError(Exception):
    """The command cannot do its job; str() is one line, printed after "stsmilter: "."""


@contextlib.contextmanager
def _cache_errors(path: str):
    """The one-shot commands are strict where the daemon degrades: a cache they cannot
    open or read is an error (one line, exit 1), never moved aside nor replaced."""
    from stsmilter.engine.store import StoreError

    try:
        yield
    except StoreError as e:
        text = str(e) if str(e).startswith("cache ") else f"cache {path}: {e}"
        raise CommandError(text) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        command = self.prog.partition(" ")[2]  # "stsmilter cache purge" -> "cache purge"
        raise UsageError(f"{command}: {message}" if command else message)


def _load_config(args) -> config_mod.Config:
    return config_mod.load(args.config)


def _as_service_user(cfg: config_mod.Config, *kinds: str) -> None:
    """Take the daemon's identity before touching what the daemon uses (kinds: preflight
    CACHE and/or FETCH): as root with a [daemon] user, create the cache directory for
    that user if missing, then drop to it; everything else happens as that user."""
    from stsmilter.service import daemon, preflight

    preflight.enter_service_identity(cfg, create=True, kinds=kinds, before_drop=lambda: daemon.import_everything(cfg))


def _engine(cfg: config_mod.Config, no_cache: bool = False):
    from stsmilter import engine
    from stsmilter.service import preflight

    if no_cache:
        cfg = cfg.replace(cache={"path": "", "redis": ""})
    _as_service_user(cfg, preflight.CACHE, preflight.FETCH)
    try:
        with _cache_errors(_cache_name(cfg)):
            return engine.open_engine(cfg, one_shot=True)
    except CommandError as e:
        raise CommandError(f"{e} (--no-cache does without it)") from None


def result_as_dict(result) -> dict:
    from stsmilter.service.control import iso_time  # the times as `cache list` shows them

    return {
        "domain": result.domain,
        "status": result.status,
        "reason": result.reason,
        "source": result.source,
        "id": result.policy_id,
        "policy": result.policy.as_dict() if result.policy is not None else None,
        "fetched": iso_time(result.fetched_at),
        "expires": iso_time(result.expires),
    }


def _print_result(data: dict) -> None:
    print(f"domain:  {data['domain']}")
    print(f"status:  {data['status']}" + (f" ({data['reason']})" if data["reason"] else ""))
    if data["source"]:
        print(f"source:  {data['source']}")
    if data["id"]:
        print(f"id:      {data['id']}")
    pol = data["policy"]
    if pol:
        print(f"mode:    {pol['mode']}")
        print(f"max_age: {pol['max_age']}")
        for mx in pol["mx"]:
            print(f"mx:      {mx}")
        print(f"fetched: {data['fetched']}")
        print(f"expires: {data['expires']}")


def cmd_query(args) -> int:
    from stsmilter.engine import policy

    cfg = _load_config(args)
    try:
        domain = policy.normalize_domain(args.domain)
    except ValueError as e:
        raise UsageError(f"query: {args.domain!r}: {e}") from None
    if domain is None:
        raise UsageError(f"query: {args.domain!r}: an address literal has no MTA-STS policy")
    discovery = _engine(cfg, args.no_cache)
    try:
        data = result_as_dict(discovery.lookup(domain))
    finally:
        discovery.close()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_result(data)
    return EXIT_OK


def cmd_check(args) -> int:
    from stsmilter.engine.decision import Decider

    cfg = _load_config(args)
    discovery = _engine(cfg, args.no_cache)
    try:
        decider = Decider(discovery, cfg.milter, cfg.scope)
        decisions = [decider.decide(address) for address in args.addresses]
    finally:
        discovery.close()
    if args.json:
        print(json.dumps([d.as_dict() for d in decisions], indent=2))
        return EXIT_OK
    for d in decisions:
        data = d.as_dict()
        line = f"{d.recipient}: {d.action}"
        if data["reply"]:
            line += f" {data['reply']}"
        line += f" (reason {d.reason}"
        if d.mode:
            line += f", mode {d.mode}, id {d.policy_id}"
        if d.would != d.action:
            line += f", would {d.would}"
        line += ")"
        print(line)
        if d.mx:
            print(f"    mx: {', '.join(d.mx)}")
        if d.patterns:
            print(f"    policy mx: {', '.join(d.patterns)}")
    return EXIT_OK


def cmd_check_config(args) -> int:
    from stsmilter.service import daemon, preflight

    cfg = _load_config(args)
    # What `run` would refuse, checked the same way and as the same user; nothing created.
    preflight.enter_service_identity(cfg, create=False, before_drop=lambda: daemon.import_everything(cfg))
    warning = preflight.cache_warning(cfg)  # not a refusal: run starts, without the file
    if warning:
        print(f"stsmilter: warning: {warning}", file=sys.stderr)
    if args.quiet:
        return EXIT_OK
    print(f"# effective configuration from {cfg.source}")
    section = None
    for name, key, value in cfg.items():
        if name != section:
            print(f"{'' if section is None else chr(10)}[{name}]")
            section = name
        if key == "socket_mode":
            text = f"{value:04o}"
        elif (name, key) == ("metrics", "listen") and value is not None:
            text = str(value).replace("inet:", "", 1)  # HOST:PORT, its documented form
        else:
            text = config_mod.format_value(value)
        print(f"{key} = {text}".rstrip())
    return EXIT_OK


def _cache_name(cfg) -> str:
    from stsmilter.engine.store import configured_name

    return configured_name(cfg.cache)


def _read_store(cfg, read):
    """read(store) on the configured store, opened strictly and closed again."""
    from stsmilter.engine.store import open_configured

    with _cache_errors(_cache_name(cfg)):
        store = open_configured(cfg.cache, recover=False)
        try:
            value = read(store)
        finally:
            store.close()
    if store.bad_entries:
        key, reason = store.last_bad
        print(f"stsmilter: cache {_cache_name(cfg)}: skipped {store.bad_entries} unusable entries"
              f" (latest: {key}: {reason})", file=sys.stderr)
    return value


def _ask_daemon(cfg, request: str) -> Optional[List[str]]:
    """The running daemon's answer (its lines) through its control socket, or None when
    no daemon runs with this PID file (or it has none)."""
    from stsmilter.service import control

    path = control.control_path(cfg.daemon.pidfile)
    if not path:
        return None
    try:
        lines = list(control.request(path, request))
    except control.NoDaemon:
        return None
    except OSError as e:
        raise CommandError(f"cache control {path}: {e.strerror or e}") from None
    if not lines or lines[-1].startswith("error "):
        raise CommandError(f"cache control {path}: {lines[-1] if lines else 'no answer'}")
    return lines


def _daemon_rows(cfg) -> Optional[list]:
    lines = _ask_daemon(cfg, "list")
    if lines is None:
        return None
    try:
        if not lines[-1].startswith("end "):
            raise ValueError("it ended early")
        return [json.loads(line) for line in lines[:-1]]
    except ValueError as e:
        raise CommandError(f"cache control: the daemon's answer is not a list: {e}") from None


def cmd_cache_list(args) -> int:
    cfg = _load_config(args)
    from stsmilter.service import control, preflight

    _as_service_user(cfg, preflight.CACHE)
    rows = _daemon_rows(cfg)  # what the running daemon serves, if one runs
    served = rows is not None
    if rows is None:
        rows = [control.entry_row(e) for e in _read_store(cfg, lambda store: list(store.entries()))]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            failing = f" refresh failing x{row['refresh_failures']} ({row['last_error']})" if row["refresh_failures"] else ""
            print(f"{row['domain']} id={row['id']} mode={row['mode']} expires={row['expires']}{failing}")
    sys.stdout.flush()  # the listing first, then where it came from (a closed pipe stops here)
    noun = "policy" if len(rows) == 1 else "policies"
    print(f"{len(rows)} {noun} served by the running daemon" if served else f"{len(rows)} cached {noun}",
          file=sys.stderr)
    return EXIT_OK


def cmd_cache_purge(args) -> int:
    if bool(args.all) == bool(args.domains):
        raise UsageError("cache purge: name domains or --all (not both)")
    cfg = _load_config(args)
    from stsmilter.engine import policy
    from stsmilter.service import preflight

    _as_service_user(cfg, preflight.CACHE)
    try:
        named = [] if args.all else [policy.normalize_domain(d) for d in args.domains]
    except ValueError as e:
        raise UsageError(f"cache purge: {e}") from None

    named = [d for d in named if d]

    def purge(store) -> int:
        if args.all and store.shared:
            removed = store.purge_all()
        else:
            domains = [e.domain for e in store.entries()] if args.all else named
            removed = sum(1 for d in domains if store.delete(d))
        if store.shared:  # every daemon sharing the store forgets it too (fleet.py)
            for domain in [""] if args.all else named:
                store.announce("purge-all" if args.all else "purge", domain)
        return removed

    removed = _read_store(cfg, purge)
    print(f"purged {removed} {'policy' if removed == 1 else 'policies'}")
    if cfg.cache.redis:  # the local daemon hears it from Redis like every other one
        print(f"stsmilter: every daemon sharing {_cache_name(cfg)} forgets it too", file=sys.stderr)
        return EXIT_OK
    dropped = _tell_daemon(cfg, None if args.all else named)
    if dropped is not None:
        print(f"stsmilter: the running daemon dropped {dropped} from memory", file=sys.stderr)
    else:  # e.g. a daemon run with another [daemon] pidfile still serves what was purged
        from stsmilter.service.control import control_path

        where = control_path(cfg.daemon.pidfile)
        print(f"stsmilter: no daemon was told: none answers on {where}" if where else
              "stsmilter: no daemon was told: [daemon] pidfile is empty, so no daemon has a control socket",
              file=sys.stderr)
    return EXIT_OK


def _tell_daemon(cfg, domains: Optional[List[str]]) -> Optional[int]:
    """Make the local daemon forget domains (everything if None); how many policies it
    dropped, or None if no daemon runs."""
    from stsmilter.service.control import MAX_REQUEST

    requests = ["purge-all"] if domains is None else []
    for domain in domains or ():  # requests under the control socket's size cap
        if requests and len(requests[-1]) + len(domain) + 1 < MAX_REQUEST:
            requests[-1] += " " + domain
        else:
            requests.append("purge " + domain)
    dropped = 0
    for request in requests:
        lines = _ask_daemon(cfg, request)
        if lines is None:
            return None
        words = lines[-1].split()
        if len(words) != 2 or words[0] != "purged" or not words[1].isdigit():
            raise CommandError(f"cache control: unexpected answer {lines[-1][:80]!r}")
        dropped += int(words[1])
    return dropped


def cmd_run(args) -> int:
    from stsmilter.service import daemon

    return daemon.run(args.config)


CONFIG_HELP = f"configuration file (default {config_mod.DEFAULT_CONFIG_PATH})"


def _add_config_option(parser: argparse.ArgumentParser, default) -> None:
    # Accepted before the command ("stsmilter -c FILE query ...") and after it. The
    # commands' copy defaults to SUPPRESS so that it does not overwrite the global one.
    parser.add_argument("-c", "--config", metavar="FILE", default=default, help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stsmilter", description="MTA-STS (RFC 8461) milter and TLS-policy socketmap")
    parser.add_argument("--version", action="version", version=f"stsmilter {__version__}")
    _add_config_option(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(subparsers, name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        _add_config_option(p, argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    command(sub, "run", cmd_run, "run the milter, the socketmap and the metrics endpoint in the foreground")
    p = command(sub, "query", cmd_query, "show the MTA-STS policy that applies to a domain")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-cache", action="store_true", help="ignore the persistent cache (memory only)")
    p.add_argument("domain", metavar="DOMAIN", help="the recipient domain, e.g. example.com")
    p = command(sub, "check", cmd_check, "show the milter's decision for recipients of an in-scope sender")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per recipient")
    p.add_argument("--no-cache", action="store_true", help="ignore the persistent cache (memory only)")
    p.add_argument("addresses", metavar="ADDRESS", nargs="+", help="recipient addresses, e.g. user@example.com")
    p = command(sub, "check-config", cmd_check_config, "validate a configuration file and print the effective values")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for a valid file (exit status only)")
    cache = sub.add_parser("cache", help="inspect or purge the policy cache", description="inspect or purge the policy cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    cache_sub.required = True
    p = command(cache_sub, "list", cmd_cache_list, "list cached policies")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per policy")
    p = command(cache_sub, "purge", cmd_cache_purge, "remove cached policies")
    p.add_argument("--all", action="store_true", help="remove every cached policy")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="domains whose cached policy to remove")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from stsmilter.service.preflight import StartupError

    try:
        try:
            args = build_parser().parse_args(argv)
            status = args.func(args)
        except SystemExit as e:  # --help, --version
            status = e.code or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, like a tool killed by SIGPIPE.
        # stdout now points at /dev/null so that the final flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    except UsageError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_USAGE
    except config_mod.ConfigError as e:
        print(f"stsmilter: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR
    except OSError as e:
        print(f"stsmilter: {e}", file=sys.stderr)
        return EXIT_ERROR
