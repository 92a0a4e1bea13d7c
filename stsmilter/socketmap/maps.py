"""Per-map settings: which [socketmap] settings answer a request, by its map name.

Postfix names the map in every request (``socketmap:inet:HOST:PORT:NAME`` asks
"NAME DOMAIN"); postfix-mta-sts-resolver calls such names zones. A ``[socketmap NAME]``
section (config.maps) overrides config.MAP_KEYS for requests with that name; any other
name gets [socketmap] itself. Sendmail's ``sts`` map (FEATURE(`sts')) keeps its own
meaning, no DANE check (tlspolicy.dane_first), unless its section sets ``dane``.

Metrics name the map only by what the configuration names: a section's name, ``sts``,
and DEFAULT_LABEL for every other name a client sends (bounded whatever clients send).
"""

import dataclasses
from typing import Any, Dict, Mapping, Tuple

from stsmilter.engine.tlspolicy import SENDMAIL_MAP, dane_first

DEFAULT_LABEL = "default"


def effective(base, name: str, overrides: Mapping[str, Any]):
    """The settings a map named name answers with: base ([socketmap]) with the section's
    overrides; for a map whose MTA does its own DANE ("sts") dane = no unless set."""
    values = dict(overrides)
    if "dane" not in values and not dane_first(name.encode()):
        values["dane"] = "no"
    return dataclasses.replace(base, **values)


class MapTable:
    """Map name (bytes, as requested) -> (settings, metrics label); built once per
    configuration (start, reload), read by the socketmap's loop thread."""

    __slots__ = ("base", "default", "by_name")

    def __init__(self, base, sections: Mapping[str, Mapping[str, Any]] = ()):
        self.base = base
        self.default: Tuple[Any, str] = (base, DEFAULT_LABEL)
        self.by_name: Dict[bytes, Tuple[Any, str]] = {}
        for name, overrides in dict(sections).items():
            self.by_name[name.encode()] = (effective(base, name, overrides), name)
        sts = SENDMAIL_MAP.decode()
        if SENDMAIL_MAP not in self.by_name:
            self.by_name[SENDMAIL_MAP] = (effective(base, sts, {}), sts)

    def get(self, name: bytes) -> Tuple[Any, str]:
        """(settings, label) for a request's map name (the socketmap's fast path reads
        by_name and default itself)."""
        return self.by_name.get(name, self.default)

    def labels(self):
        """Every label this table counts with."""
        return sorted({label for _settings, label in self.by_name.values()} | {DEFAULT_LABEL})
