"""What every `stsmilter` subcommand shares: its errors, the configuration, the service
user, strict access to the cache."""

from __future__ import annotations

import contextlib

from stsmilter import config as config_mod

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141


class UsageError(Exception):
    """str() is the line after "stsmilter: " (every error line carries that prefix once)."""


class CommandError(Exception):
    """The command cannot do its job; str() is one line, printed after "stsmilter: "."""


@contextlib.contextmanager
def cache_errors(path: str):
    """The one-shot commands are strict where the daemon degrades: a cache they cannot
    open or read is an error (one line, exit 1), never moved aside nor replaced."""
    from stsmilter.engine.store import StoreError

    try:
        yield
    except StoreError as e:
        text = str(e) if str(e).startswith("cache ") else f"cache {path}: {e}"
        raise CommandError(text) from None


def load_config(args) -> config_mod.Config:
    return config_mod.load(args.config)


def as_service_user(cfg: config_mod.Config, *kinds: str) -> None:
    """Take the daemon's identity before touching what the daemon uses (kinds: preflight
    CACHE and/or FETCH): as root with a [daemon] user, create the cache directory for
    that user if missing, then drop to it; everything else happens as that user."""
    from stsmilter.service import daemon, preflight

    preflight.enter_service_identity(cfg, create=True, kinds=kinds, before_drop=lambda: daemon.import_everything(cfg))
