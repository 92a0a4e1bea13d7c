"""`stsmilter query`, `check` and `check-config`: what the engine and the milter would do,
asked from the command line with the daemon's configuration."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

from stsmilter import config as config_mod
from stsmilter.cli.common import EXIT_OK, CommandError, UsageError, as_service_user, cache_errors, load_config
from stsmilter.cli.cache import cache_name


def _engine(cfg: config_mod.Config, no_cache: bool = False):
    from stsmilter import engine
    from stsmilter.service import preflight

    if no_cache:
        cfg = cfg.replace(cache={"path": "", "redis": ""})
    as_service_user(cfg, preflight.CACHE, preflight.FETCH)
    try:
        with cache_errors(cache_name(cfg)):
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

    cfg = load_config(args)
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


def _complete_tls(checker, decisions, timeout: float) -> list:
    """The MX TLS check of every host a decision left unknown (the milter stops waiting
    at the first good host), waited for up to timeout in all: shown, not decided on."""
    deadline = time.monotonic() + timeout
    completed = []
    for d in decisions:
        if any(result is None for _host, result in d.tls):
            d = d._replace(tls=tuple((host, result if result is not None else _tls_result(checker, host, deadline))
                                     for host, result in d.tls))
        completed.append(d)
    return completed


def _tls_result(checker, host: str, deadline: float):
    left = max(0.0, deadline - time.monotonic())
    try:
        return checker.submit(host, wait=left).result(left)
    except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
        return None


def _tls_line(item: dict) -> str:
    if item["result"] is None:
        return f"    mx tls: {item['host']}: not known yet"
    return f"    mx tls: {item['host']}: {item['result']} ({item['age']:.0f} s ago): {item['detail']}"


def cmd_check(args) -> int:
    from stsmilter.engine.decision import Decider

    cfg = load_config(args)
    discovery = _engine(cfg, args.no_cache)
    now = None
    try:
        decider = Decider(discovery, cfg.milter, cfg.scope)
        decisions = [decider.decide(address) for address in args.addresses]
        if discovery.mxtls is not None:
            decisions = _complete_tls(discovery.mxtls, decisions, cfg.milter.lookup_timeout)
            now = discovery.mxtls.clock()
    finally:
        discovery.close()
    if args.json:
        print(json.dumps([d.as_dict(now) for d in decisions], indent=2))
        return EXIT_OK
    for d in decisions:
        data = d.as_dict(now)
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
        for item in data["mx_tls"]:
            print(_tls_line(item))
    return EXIT_OK


def cmd_check_config(args) -> int:
    from stsmilter.service import daemon, preflight

    cfg = load_config(args)
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
            if section == config_mod.MAP_SECTION:
                _print_map_sections(cfg)
            print(f"{'' if section is None else chr(10)}[{name}]")
            section = name
        if key == "socket_mode":
            text = f"{value:04o}"
        elif (name, key) == ("metrics", "listen") and value is not None:
            text = str(value).replace("inet:", "", 1)  # HOST:PORT, its documented form
        else:
            text = config_mod.format_value(value)
        print(f"{key} = {text}".rstrip())
    if section == config_mod.MAP_SECTION:
        _print_map_sections(cfg)
    return EXIT_OK


def _print_map_sections(cfg) -> None:
    """Each [socketmap NAME] section with the effective value of each of its keys (its own
    or [socketmap]'s), as the socketmap answers that map name."""
    from stsmilter.socketmap.maps import effective

    for name, overrides in cfg.maps.items():
        settings = effective(cfg.socketmap, name, overrides)
        print(f"\n[{config_mod.MAP_SECTION} {name}]")
        for key in config_mod.MAP_KEYS:
            print(f"{key} = {config_mod.format_value(getattr(settings, key))}")
