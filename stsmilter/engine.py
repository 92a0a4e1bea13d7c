"""Builds the engine (resolver, fetcher, cache, discovery) from a Config.

Shared by the daemon and the one-shot CLI commands, so `stsmilter query` sees exactly
what the running daemon would."""

from __future__ import annotations

import ssl

from stsmilter import dns
from stsmilter.config import ConfigError
from stsmilter.cache import PolicyCache
from stsmilter.discovery import Discovery, Settings
from stsmilter.fetch import Fetcher
from stsmilter.store import open_store


def make_resolver(config) -> dns.Resolver:
    return dns.Resolver(nameservers=config.dns.nameservers, port=config.dns.port, timeout=config.dns.timeout)


def make_fetcher(config, resolver: dns.Resolver) -> Fetcher:
    f = config.fetch
    try:
        return Fetcher(resolver, port=f.port, timeout=f.timeout, ca_file=f.ca_file, allow_private=f.allow_private_addresses)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{config.source}: [fetch] ca_file {f.ca_file}: {getattr(e, 'strerror', None) or e}") from None


def open_cache(config) -> PolicyCache:
    c = config.cache
    return PolicyCache(open_store(c.path), c.max_entries, c.negative_ttl, c.failure_backoff)


def open_engine(config) -> Discovery:
    """A Discovery over the configured store, its memory filled from the store."""
    resolver = make_resolver(config)
    cache = open_cache(config)
    cache.load()
    return Discovery(resolver, make_fetcher(config, resolver), cache, Settings.from_config(config))


def reconfigure(discovery: Discovery, config) -> None:
    resolver = make_resolver(config)
    discovery.reconfigure(resolver, make_fetcher(config, resolver), Settings.from_config(config))
