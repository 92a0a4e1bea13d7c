"""`stsmilter cache list` and `cache purge`: the cached policies, from the running daemon
(its control socket) or from the store itself, and purges that reach every daemon."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from stsmilter.cli.common import EXIT_OK, CommandError, UsageError, as_service_user, cache_errors, load_config


def cache_name(cfg) -> str:
    from stsmilter.engine.store import configured_name

    return configured_name(cfg.cache)


def _read_store(cfg, read):
    """read(store) on the configured store, opened strictly and closed again."""
    from stsmilter.engine.store import open_configured

    with cache_errors(cache_name(cfg)):
        store = open_configured(cfg.cache, recover=False)
        try:
            value = read(store)
        finally:
            store.close()
    if store.bad_entries:
        key, reason = store.last_bad
        print(f"stsmilter: cache {cache_name(cfg)}: skipped {store.bad_entries} unusable entries"
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
    cfg = load_config(args)
    from stsmilter.service import control, preflight

    as_service_user(cfg, preflight.CACHE)
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
    cfg = load_config(args)
    from stsmilter.engine import policy
    from stsmilter.service import preflight

    as_service_user(cfg, preflight.CACHE)
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
        print(f"stsmilter: every daemon sharing {cache_name(cfg)} forgets it too", file=sys.stderr)
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
