"""INI configuration -> frozen, typed Config.

The keys, their types and defaults are config/schema.py's SCHEMA. Values are converted
once at load time; an unknown section or key, or a bad value, is a ConfigError naming
the file, the line, the key and the expected form.
"""

import configparser
import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

from stsmilter.config.schema import SCHEMA, Listen, parse_listen, plain_number  # noqa: F401 (the package's interface)
from stsmilter.config.schema import MAP_KEYS, MAP_SECTION, map_section_name  # noqa: F401

DEFAULT_CONFIG_PATH = "/etc/stsmilter/stsmilter.conf"


class ConfigError(Exception):
    """A configuration file that cannot be used; str() is one line for the operator."""


def _section_class(section: str) -> type:
    fields = [(key, Any) for key in SCHEMA[section]]
    cls = dataclasses.make_dataclass(section.capitalize() + "Config", fields, frozen=True)
    return cls


_SECTION_CLASSES = {name: _section_class(name) for name in SCHEMA}


@dataclasses.dataclass(frozen=True)
class Config:
    daemon: Any
    milter: Any
    scope: Any
    dns: Any
    fetch: Any
    probe: Any
    cache: Any
    socketmap: Any
    metrics: Any
    source: str = "<defaults>"
    # (section, key) -> line number in source, for what the file sets (see where()).
    line_numbers: Any = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # [socketmap NAME] sections, in file order: NAME -> {key: typed value} for the keys
    # (of MAP_KEYS) the section sets; the socketmap front end applies them over [socketmap].
    maps: Any = dataclasses.field(default_factory=dict, hash=False)

    def where(self, section: str, key: str) -> str:
        """'FILE:LINE' of a key the file sets, 'FILE' for a default: the start of an error
        line about that key, found after loading (preflight, engine, binding a listener)."""
        return _where(self.source, self.line_numbers, section, key)

    def map_where(self, name: str, key: Optional[str] = None) -> str:
        """'FILE:LINE' of a [socketmap NAME] section (key None) or of a key in it."""
        for (section, line_key), _line in self.line_numbers.items():
            if line_key == key and _map_name_or_none(section) == name:
                return _where(self.source, self.line_numbers, section, key)
        return self.source

    def items(self):
        """(section, key, value) for every key, in schema order."""
        for section in SCHEMA:
            values = getattr(self, section)
            for key in SCHEMA[section]:
                yield section, key, getattr(values, key)

    def replace(self, **sections: Dict[str, Any]) -> "Config":
        """A copy with some keys changed: replace(milter={'dry_run': True})."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()
        }
        return dataclasses.replace(self, **changed)


def _line_numbers(lines) -> Dict[Tuple[str, Optional[str]], int]:
    """(section, None) -> line (1-based) of [section], (section, key) -> line of key inside
    it: one pass over the file, for every error message that names a line."""
    numbers: Dict[Tuple[str, Optional[str]], int] = {}
    current = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        m = re.fullmatch(r"\[([^\]]+)\]", stripped)
        if m:
            current = m.group(1).strip()
            numbers.setdefault((current, None), number)
            continue
        if current is not None:
            m = re.match(r"([^=:\s]+)\s*[=:]", stripped)
            if m:
                numbers.setdefault((current, m.group(1).lower()), number)
    return numbers


def _where(filename: str, line_numbers, section: str, key: Optional[str]) -> str:
    """'FILE:LINE' of [section] or its key, 'FILE' where the file does not set it."""
    line = line_numbers.get((section, key))
    return f"{filename}:{line}" if line else filename


def defaults() -> Config:
    return _build({}, "<defaults>", {})


def load(path: Optional[str] = None, *, must_exist: bool = False) -> Config:
    """Load path (default DEFAULT_CONFIG_PATH). A missing default file means defaults;
    a missing file named explicitly (must_exist) is an error."""
    filename = path or DEFAULT_CONFIG_PATH
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if must_exist or path is not None:
            raise ConfigError(f"{filename}: no such file") from None
        return defaults()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{filename}: cannot read: {e}") from None
    return loads(text, filename)


def loads(text: str, filename: str = "<string>") -> Config:
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), empty_lines_in_values=False, strict=True
    )
    try:
        parser.read_string(text, source=filename)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(f"{filename}:{e.lineno}: [{e.section}] {e.option}: set twice") from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(f"{filename}:{e.lineno}: [{e.section}]: section appears twice") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(f"{filename}:{e.lineno}: a [section] header must come first") from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0] if e.errors else 0
        raise ConfigError(f"{filename}:{lineno}: not a 'key = value' line") from None
    line_numbers = _line_numbers(text.splitlines())
    if parser.defaults():
        raise ConfigError(f"{filename}:{line_numbers.get(('DEFAULT', None), 0)}: [DEFAULT]: unknown section")
    raw: Dict[str, Dict[str, str]] = {}
    maps: Dict[str, Dict[str, Any]] = {}
    for section in parser.sections():
        where_section = f"{filename}:{line_numbers.get((section, None), 0)}"
        try:
            map_name = map_section_name(section)
        except ValueError as e:
            raise ConfigError(f"{where_section}: [{section}]: expected [{MAP_SECTION} NAME] with NAME {e}") from None
        if map_name is not None:
            if map_name in maps:
                raise ConfigError(f"{where_section}: [{MAP_SECTION} {map_name}]: section appears twice")
            maps[map_name] = _map_section(parser, section, map_name, filename, line_numbers)
            continue
        if section not in SCHEMA:
            known = ", ".join(f"[{s}]" for s in SCHEMA) + f", [{MAP_SECTION} NAME]"
            raise ConfigError(
                f"{filename}:{line_numbers.get((section, None), 0)}: [{section}]: unknown section (expected one of {known})"
            )
        for key, value in parser.items(section, raw=True):
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{filename}:{line_numbers.get((section, key), 0)}: [{section}] {key}: unknown key"
                    f" (keys of [{section}]: {', '.join(SCHEMA[section])})"
                )
            raw.setdefault(section, {})[key] = value
    return _build(raw, filename, line_numbers, maps)


def _map_name_or_none(section: str) -> Optional[str]:
    try:
        return map_section_name(section)
    except ValueError:
        return None


def _map_section(parser, section: str, name: str, filename: str, line_numbers) -> Dict[str, Any]:
    """The typed values a [socketmap NAME] section sets (only MAP_KEYS, [socketmap]'s converters)."""
    label = f"[{MAP_SECTION} {name}]"
    values: Dict[str, Any] = {}
    for key, text in parser.items(section, raw=True):
        where = _where(filename, line_numbers, section, key)
        if key not in MAP_KEYS:
            raise ConfigError(f"{where}: {label} {key}: unknown key (keys of {label}: {', '.join(MAP_KEYS)};"
                              f" the others are [{MAP_SECTION}]'s alone)")
        try:
            values[key] = SCHEMA[MAP_SECTION][key][0](text)
        except ValueError as e:
            raise ConfigError(f"{where}: {label} {key} = {text.strip()!r}: expected {e}") from None
    return values


def _build(raw: Dict[str, Dict[str, str]], filename: str, line_numbers, maps=None) -> Config:
    sections = {}
    for section, keys in SCHEMA.items():
        values = {}
        for key, (convert, default) in keys.items():
            text = raw.get(section, {}).get(key, default)
            try:
                values[key] = convert(text)
            except ValueError as e:
                where = _where(filename, line_numbers, section, key)
                raise ConfigError(f"{where}: [{section}] {key} = {text.strip()!r}: expected {e}") from None
        sections[section] = _SECTION_CLASSES[section](**values)
    config = Config(source=filename, line_numbers=line_numbers, maps=dict(maps or {}), **sections)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    if not config.milter.socket and config.socketmap.listen is None:
        raise ConfigError(f"{config.where('milter', 'socket')}: [milter] socket and [socketmap] listen are both empty:"
                          " nothing to serve (set at least one)")
    if config.fetch.ca_file and not config.fetch.ca_file.startswith("/"):
        raise ConfigError(f"{config.where('fetch', 'ca_file')}: [fetch] ca_file: expected an absolute path")
    if config.probe.ca_file and not config.probe.ca_file.startswith("/"):
        raise ConfigError(f"{config.where('probe', 'ca_file')}: [probe] ca_file: expected an absolute path")
    if config.daemon.pidfile and not config.daemon.pidfile.startswith("/"):  # else: relative to any cwd
        raise ConfigError(f"{config.where('daemon', 'pidfile')}: [daemon] pidfile: expected an absolute path or empty")
    if config.cache.path and config.cache.path != ":memory:" and not config.cache.path.startswith("/"):
        raise ConfigError(f"{config.where('cache', 'path')}: [cache] path: expected an absolute path or empty")


def format_value(value: Any) -> str:
    """A typed value written back in config-file form (for check-config)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    if value is None:
        return ""
    if isinstance(value, float):
        return plain_number(value)  # "5", as the shipped file writes it, not "5.0"
    return str(value)
