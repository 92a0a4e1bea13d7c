"""Builds the engine (resolver, fetcher, cache, discovery, DANE and MX TLS checkers) from a Config.

Shared by the daemon and the one-shot CLI commands, so `stsmilter query` sees exactly
what the running daemon would."""

from __future__ import annotations

import dataclasses
import ssl

from stsmilter.engine import dane, dns, mxtls, mxtls_checker
from stsmilter.config import ConfigError
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import Discovery, Settings
from stsmilter.engine.loop import EngineLoop
from stsmilter.engine.fetch import Fetcher
from stsmilter.engine.fleet import Fleet, SharedFleet
from stsmilter.engine.limits import PriorityLimiter
from stsmilter.engine.store import open_configured


def dns_slots(config) -> PriorityLimiter:
    """The bound on DNS queries in flight, shared by discovery and the DANE checks."""
    return PriorityLimiter(config.dns.max_concurrent, "dns")


def make_resolver(config, limiter=None) -> dns.Resolver:
    d = config.dns
    try:
        return dns.Resolver(nameservers=d.nameservers, port=d.port, timeout=d.timeout, limiter=limiter)
    except dns.DnsError as e:  # empty nameservers and no usable /etc/resolv.conf
        servers = " ".join(d.nameservers) or "(empty: the system resolver, /etc/resolv.conf)"
        raise ConfigError(f"{config.where('dns', 'nameservers')}: [dns] nameservers {servers}: {e}") from None


def make_fetcher(config, resolver: dns.Resolver) -> Fetcher:
    f = config.fetch
    try:
        return Fetcher(resolver, port=f.port, timeout=f.timeout, ca_file=f.ca_file, allow_private=f.allow_private_addresses)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{config.where('fetch', 'ca_file')}: [fetch] ca_file {f.ca_file}: {getattr(e, 'strerror', None) or e}") from None


def open_cache(config, one_shot: bool = False) -> PolicyCache:
    """one_shot (the CLI): a cache file (or Redis) that cannot be used raises StoreError;
    the daemon moves it aside or runs memory-only instead (store/files.py)."""
    c = config.cache
    store = open_configured(c, recover=not one_shot)
    return PolicyCache(store, c.max_entries, c.negative_ttl, c.failure_backoff, failure_ttl=c.dns_failure_ttl)


def make_fleet(config, cache: PolicyCache, listening: bool = True) -> Fleet:
    """Coordination with the other daemons sharing the store, if it is shared. Without
    listening (a one-shot command) a wait for another daemon's answer polls more often."""
    if not cache.store.shared:
        return Fleet()
    return SharedFleet(cache, fleet_lock_seconds(config), poll=1.0 if listening else 0.2)


def fleet_lock_seconds(config) -> float:
    """The fleet lock outlives one discovery: a TXT lookup plus a fetch, each within its timeout."""
    return config.dns.timeout + config.fetch.timeout + 1.0


def _dane_parts(config, limiter):
    resolver = dane.DaneResolver(nameservers=config.dns.nameservers, port=config.dns.port,
                                 timeout=config.dns.timeout, limiter=limiter)
    settings = dane.Settings(mx_ttl=config.cache.mx_ttl, max_entries=config.cache.max_entries)
    return resolver, settings


def dane_wanted(config) -> bool:
    """[socketmap] dane = auto, or a [socketmap NAME] section sets it (the socketmap's
    maps.py decides per request; the milter follows the checker whenever there is one)."""
    return config.socketmap.dane == "auto" or any(
        overrides.get("dane") == "auto" for overrides in getattr(config, "maps", {}).values())


def make_dane(config, discovery: Discovery):
    """The DANE checker when some map has dane = auto, else None: on the discovery's loop,
    its DNS queries under the same bound."""
    if not dane_wanted(config):
        return None
    return dane.DaneChecker(*_dane_parts(config, discovery.resolver.limiter), engine=discovery.engine)


def probe_context(config):
    """The TLS context of the MX TLS checks: ConfigError naming [probe] ca_file if unusable."""
    ca_file = config.probe.ca_file
    try:
        return mxtls.make_context(ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{config.where('probe', 'ca_file')}: [probe] ca_file {ca_file}: {getattr(e, 'strerror', None) or e}") from None


def _probe_settings(config) -> mxtls.Settings:
    p = config.probe
    return mxtls.Settings(port=p.port, helo_name=p.helo_name or mxtls.default_helo_name(), timeout=p.timeout,
                          ttl=p.ttl, failure_ttl=p.failure_ttl, max_entries=config.cache.max_entries,
                          allow_private=config.fetch.allow_private_addresses)


def make_mxtls(config, discovery: Discovery, context=None):
    """The MX TLS checker when [probe] enabled = yes, else None: on the discovery's loop,
    its address lookups under the DNS bound, at most [probe] max_concurrent checks at once.
    context: probe_context(config), if made already."""
    if not config.probe.enabled:
        return None
    return mxtls_checker.MxTlsChecker(discovery.resolver, _probe_settings(config), context or probe_context(config),
                              engine=discovery.engine, limiter=PriorityLimiter(config.probe.max_concurrent, "probe"))


def open_engine(config, one_shot: bool = False) -> Discovery:
    """A Discovery over the configured store, its memory filled from the store.
    one_shot (the CLI): every lookup re-checks the TXT id and waits for it (query and
    check are how an administrator verifies a change: a new id is fetched at once), and
    a cache that cannot be opened is an error (StoreError)."""
    resolver = make_resolver(config, dns_slots(config))
    fetcher = make_fetcher(config, resolver)
    context = probe_context(config) if config.probe.enabled else None  # ConfigError before anything opens
    cache = open_cache(config, one_shot)
    cache.load()
    settings = Settings.from_config(config)
    if one_shot:
        settings = dataclasses.replace(settings, id_check_interval=0.0, recheck_in_background=False)
    fleet = make_fleet(config, cache, listening=not one_shot)
    discovery = Discovery(resolver, fetcher, cache, settings, fleet=fleet, engine=EngineLoop())
    discovery.dane = make_dane(config, discovery)
    discovery.mxtls = make_mxtls(config, discovery, context)
    if not one_shot:
        discovery.fleet.start()  # the daemon hears the fleet's events; a command only polls
    return discovery


def reconfigure(discovery: Discovery, config) -> None:
    slots = getattr(discovery.resolver, "limiter", None)  # the bound is read at start only (tests: fakes)
    resolver = make_resolver(config, slots)
    fetcher = make_fetcher(config, resolver)  # ConfigError for [fetch] ca_file: nothing changed yet
    context = probe_context(config) if config.probe.enabled else None  # and for [probe] ca_file
    discovery.reconfigure(resolver, fetcher, Settings.from_config(config))
    if isinstance(discovery.fleet, SharedFleet):  # new [dns]/[fetch] timeouts: the lock follows
        discovery.fleet.lock_seconds = fleet_lock_seconds(config)
    # [socketmap] dane switched on or off, or new DNS settings; the verdict cache stays.
    if not dane_wanted(config):
        if discovery.dane is not None:
            discovery.dane.close()
        discovery.dane = None
    elif discovery.dane is None:
        discovery.dane = make_dane(config, discovery)
    else:
        discovery.dane.reconfigure(*_dane_parts(config, slots))
    # [probe] enabled switched on or off, or new settings; the results stay. The bound
    # ([probe] max_concurrent) is read at start (or when the check is switched on).
    if not config.probe.enabled:
        if discovery.mxtls is not None:
            discovery.mxtls.close()
        discovery.mxtls = None
    elif discovery.mxtls is None:
        discovery.mxtls = make_mxtls(config, discovery, context)
    else:
        discovery.mxtls.reconfigure(resolver, _probe_settings(config), context)
