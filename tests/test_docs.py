"""The documentation agrees with the code: config keys and defaults (config.SCHEMA),
metrics (metrics.py), CLI options (cli.py) and the README's two set-up commands."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metric_names import documented_name, exposed_names, metric_objects

from stsmilter import config

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "stsmilter.conf"
MAN8 = ROOT / "man" / "stsmilter.8"
MAN5 = ROOT / "man" / "stsmilter.conf.5"
README = ROOT / "README.rst"
CONTRIB = ROOT / "contrib"

SCHEMA_KEYS = [(section, key) for section, keys in config.SCHEMA.items() for key in keys]


# --- helpers -------------------------------------------------------------------------


_ALTERNATING = {".BR", ".RB", ".BI", ".IB", ".IR", ".RI"}


def roff_text(path: Path) -> str:
    """Plain text of a man page, good enough for searching (no hyphenation, no filling)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith('.\\"'):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            try:
                args = shlex.split(rest.replace("\\", "\\\\"), posix=True)
            except ValueError:
                args = rest.split()
            args = [a.replace("\\\\", "\\") for a in args]
            line = ("" if macro in _ALTERNATING else " ").join(args)
        line = re.sub(r"\\f[BIRP]", "", line)
        line = line.replace("\\-", "-").replace("\\&", "").replace("\\(aq", "'").replace("\\(ga", "`")
        line = re.sub(r"\\\(..", " ", line)
        out.append(line)
    return "\n".join(out)


def man_section(path: Path, name: str) -> list:
    """Raw lines of one .SH section."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith(".SH"):
            inside = line[3:].strip().strip('"') == name
            continue
        if inside:
            lines.append(line)
    return lines


# --- etc/stsmilter.conf --------------------------------------------------------------


def sample_entries():
    """[(section, key, raw value, comment line above)] in file order."""
    entries, section, previous = [], None, ""
    for line in SAMPLE.read_text().splitlines():
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            section = m.group(1)
        else:
            m = re.fullmatch(r"(\w+) =(.*)", line)
            if m:
                entries.append((section, m.group(1), m.group(2).strip(), previous))
            else:
                assert not line.strip() or line.startswith("#"), f"unexpected line in {SAMPLE.name}: {line!r}"
        previous = line
    return entries


def test_sample_has_every_key_in_schema_order():
    assert [(s, k) for s, k, _v, _c in sample_entries()] == SCHEMA_KEYS


def test_sample_values_are_the_schema_defaults_verbatim():
    for section, key, value, _comment in sample_entries():
        assert value == config.SCHEMA[section][key][1], f"[{section}] {key}"


def test_sample_has_a_comment_above_every_key():
    for section, key, _value, comment in sample_entries():
        assert comment.startswith("# ") and len(comment) > 10, f"[{section}] {key}: no comment line above"


def test_sample_loads_to_the_defaults():
    loaded = config.load(str(SAMPLE))
    assert list(loaded.items()) == list(config.defaults().items())


# --- stsmilter.conf(5) ---------------------------------------------------------------


def man5_entries():
    """[(section, key, default)] from '.SS [section]' and '.B "key = default"' tags."""
    entries, section, after_tp = [], None, False
    for line in man_section(MAN5, "KEYS"):
        m = re.fullmatch(r"\.SS \"?\[(\w+)\]\"?", line)
        if m:
            section = m.group(1)
        elif line.startswith(".SS"):
            section = None  # [socketmap NAME]: man5_map_keys()
        elif after_tp and section is None:
            pass
        elif after_tp:
            m = re.fullmatch(r'\.B "(\w+) =(.*)"', line)
            assert m, f"stsmilter.conf(5): tag after .TP in [{section}] is not '.B \"key = default\"': {line!r}"
            entries.append((section, m.group(1), m.group(2).strip()))
        after_tp = line == ".TP"
    return entries


def test_man5_documents_every_key_and_only_real_keys():
    assert [(s, k) for s, k, _d in man5_entries()] == SCHEMA_KEYS


def test_man5_defaults_are_the_schema_defaults():
    for section, key, default in man5_entries():
        assert default == config.SCHEMA[section][key][1], f"[{section}] {key}"


def test_key_references_in_docs_are_real_keys():
    """'[section] key' mentioned anywhere in the man pages and contrib files exists."""
    texts = {MAN8.name: roff_text(MAN8), MAN5.name: roff_text(MAN5)}
    for path in sorted(CONTRIB.rglob("*")):
        if path.is_file() and path.suffix not in (".json", ".pyc") and "__pycache__" not in path.parts:
            texts[str(path.relative_to(ROOT))] = path.read_text()
    found = 0
    for name, text in texts.items():
        for section, key in re.findall(r"\[(\w+)\][ \t]+([a-z_]+)", text):
            if section not in config.SCHEMA:
                continue
            found += 1
            assert key in config.SCHEMA[section], f"{name}: [{section}] {key} is not a configuration key"
    assert found > 20


def restart_keys_listed(text: str, where: str) -> set:
    """The ("section", "key") pairs of the 'Keys read only at start need a restart:' list."""
    text = " ".join(text.replace("``", "").split())
    m = re.search(r"Keys read only at start need a restart: (.*?)\.(?: |$)", text)
    assert m, f"{where} lacks the 'Keys read only at start need a restart:' list"
    return set(re.findall(r"\[(\w+)\] (\w+)", m.group(1)))


def sample_comments() -> str:
    return "\n".join(line[1:] for line in SAMPLE.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize("where", ["stsmilter.conf(5)", "README.rst", "etc/stsmilter.conf"])
def test_docs_list_the_keys_that_need_a_restart(where):
    from stsmilter.service import daemon

    # A rename must fail here, not turn the check off: the docs name these keys.
    assert hasattr(daemon, "_RESTART_KEYS"), "stsmilter.daemon has no _RESTART_KEYS: renamed? update this test"
    restart_keys = daemon._RESTART_KEYS
    text = {"stsmilter.conf(5)": lambda: roff_text(MAN5), "README.rst": README.read_text,
            "etc/stsmilter.conf": sample_comments}[where]()
    assert restart_keys_listed(text, where) == set(restart_keys)


# --- stsmilter(8) --------------------------------------------------------------------


def man8_metric_entries():
    entries, after_tp = {}, False
    for line in man_section(MAN8, "METRICS"):
        if after_tp:
            m = re.fullmatch(r"\.B (stsmilter_\w+)(?:\{([\w,]*)\})?", line)
            if m:
                entries[m.group(1)] = tuple(m.group(2).split(",")) if m.group(2) else ()
        after_tp = line == ".TP"
    return entries


def test_man8_documents_every_metric_with_its_labels():
    entries = man8_metric_entries()
    expected = {documented_name(m): tuple(m._labelnames) for m in metric_objects()}
    assert entries == expected


def test_man8_lists_every_decision_reason():
    from stsmilter.engine import decision

    assert hasattr(decision, "REASONS"), "stsmilter.decision has no REASONS: renamed? update this test"
    text = " ".join(roff_text(MAN8).split())
    m = re.search(r"reason is one of (.*?)\. ", text)
    assert m, "stsmilter(8) lacks the 'reason is one of' list"
    assert sorted(r.strip() for r in m.group(1).split(",")) == sorted(decision.REASONS)


def test_man8_mentions_only_real_metric_names():
    for path in (MAN8, MAN5):
        for name in set(re.findall(r"stsmilter_[a-z_]+", roff_text(path))):
            assert name in exposed_names(), f"{path.name}: {name} is not an exposed metric name"


def test_man8_synopsis_and_options_cover_the_cli():
    import argparse

    from stsmilter import cli

    assert hasattr(cli, "build_parser"), "stsmilter.cli has no build_parser: renamed? update this test"

    synopsis = roff_text(MAN8).split("DESCRIPTION")[0]
    text = roff_text(MAN8)

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, prefix + [name])
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                yield prefix, action.option_strings

    commands = set()
    for prefix, options in walk(cli.build_parser(), []):
        if prefix:
            commands.add(" ".join(prefix))
        for option in options:
            assert option in text, f"stsmilter(8) does not mention {option} ({' '.join(prefix) or 'global'})"
    for command in commands:
        assert f"stsmilter {command}" in synopsis, f"SYNOPSIS lacks 'stsmilter {command}'"


def test_man8_has_the_required_sections():
    headings = re.findall(r"^\.SH (.+)$", MAN8.read_text(), re.M)
    for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "SIGNALS", "EXIT STATUS",
                 "METRICS", "FILES", "EXAMPLES", '"SEE ALSO"'):
        assert name in headings or name.strip('"') in headings, name


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff not installed")
    run = subprocess.run([groff, "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    mandoc = shutil.which("mandoc")
    if mandoc is not None:
        lint = subprocess.run([mandoc, "-T", "lint", "-W", "warning", str(page)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr


# --- README ------------------------------------------------------------------------


def rst_metric_table(path: Path) -> dict:
    """{name: labels} from the rows of the simple table whose first cell is ``stsmilter_...``."""
    entries, rows = {}, 0
    for line in path.read_text().splitlines():
        m = re.match(r"``(stsmilter_\w+)(?:\{([\w,]*)\})?``(?:\s|$)", line)
        if m:
            rows += 1
            entries[m.group(1)] = tuple(m.group(2).split(",")) if m.group(2) else ()
    assert rows == len(entries), f"{path.name}: a metric is listed twice"
    return entries


@pytest.mark.parametrize("name", ["README.rst", "HACKING.rst"])
def test_metrics_table_lists_exactly_the_exposed_metrics_with_their_labels(name):
    expected = {documented_name(m): tuple(m._labelnames) for m in metric_objects()}
    assert rst_metric_table(ROOT / name) == expected


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text()
    assert text.count("sh contrib/bootstrap.sh") == 2
    commands = re.findall(r"^\s+sh contrib/bootstrap\.sh (\S+)\s*$", text, re.M)
    assert commands == ["run", "test"]


@pytest.mark.parametrize("name", ["README.rst", "HACKING.rst", "bench/README.rst"])
def test_rst_renders_without_warnings(name):
    import docutils.core as docutils_core  # a test dependency (pyproject.toml): missing is a failure
    from docutils.writers.null import Writer as NullWriter  # an instance suits docutils 0.19 (Debian 12) to 0.22
    path = ROOT / name
    assert path.exists(), f"{name} is gone: update this test"
    docutils_core.publish_string(
        path.read_text(), writer=NullWriter(), settings_overrides={"halt_level": 2, "report_level": 2}
    )


def readme_command(command: str) -> str:
    """The README's description of one command (its indented definition body)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"``stsmilter {command} "))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        body.append(line.strip())
    return " ".join(body)


def json_fields(text: str) -> list:
    """The ``field`` names after '--json' with every (parenthesised remark) removed."""
    text = text.split("``--json``", 1)[1]
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return re.findall(r"``(\w+)``", text)
        text = stripped


def test_readme_json_fields_are_the_output_fields():
    from stsmilter import cli
    from stsmilter.engine import decision, policy

    check = decision.Decision("u@example.com", "example.com", "accept", "accept", "no-policy").as_dict()
    assert json_fields(readme_command("check")) == list(check)
    query = cli.result_as_dict(policy.Result("example.com", "none"))
    assert json_fields(readme_command("query")) == list(query)


def test_man8_check_json_keys_are_the_output_fields():
    from stsmilter.engine import decision

    text = " ".join(roff_text(MAN8).split())
    m = re.search(r"a list of objects with the keys (.*?)\. ", text)
    assert m, "stsmilter(8) check: no 'a list of objects with the keys' sentence"
    listed = m.group(1)
    while re.search(r"\([^()]*\)", listed):
        listed = re.sub(r"\([^()]*\)", "", listed)
    keys = [k for k in re.split(r",\s*|\s+and\s+|\s+", listed) if k]
    assert keys == list(decision.Decision("u@x.example", "x.example", "accept", "accept", "no-policy").as_dict())


def test_every_cli_option_and_argument_has_help_text():
    import argparse

    from stsmilter import cli

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, prefix + [name])
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield prefix, action

    found = list(walk(cli.build_parser(), []))
    assert len(found) > 15
    for prefix, action in found:
        assert action.help, f"stsmilter {' '.join(prefix)}: {action.option_strings or action.dest} has no help text"


# --- lines the README quotes ---------------------------------------------------------------


def readme_section(title: str) -> str:
    text = README.read_text()
    body = text.split(f"\n{title}\n{'=' * len(title)}\n", 1)[1]
    return " ".join(re.split(r"\n\S[^\n]*\n=+\n", body, maxsplit=1)[0].split())


# Words the README writes in place of a value in a quoted line.
_PLACEHOLDERS = ("DOMAIN", "ID", "REASON", "DETAIL", "HOST", "PATH", "LINK", "FILE", "LINE", "xN", "N", "H", "M", "K")
# Lines "When things go wrong" quotes from Postfix, not from stsmilter.
_POSTFIX_LINES = ("status=deferred", "warning: connect to Milter service", "warning: milter ")


def _code_strings() -> list:
    import ast

    found = []
    for path in (ROOT / "stsmilter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)  # adjacent literals arrive joined; f-strings in parts
    return found


def test_lines_quoted_in_when_things_go_wrong_are_in_the_code():
    """Every log line, reply or message "When things go wrong" quotes (a literal of four
    words or more) is made of strings the code holds: each piece between placeholders
    (DOMAIN, N, ...), ': ', '; ' and a socketmap status word is in one string literal."""
    strings = _code_strings()
    quoted = [q for q in re.findall(r"``(.+?)``", readme_section("When things go wrong"))
              if len(q.split()) >= 4 and not q.startswith(("stsmilter ", "stsmilter: configuration error:"))
              and not q.startswith(_POSTFIX_LINES)]
    assert len(quoted) >= 12
    splitter = r"\b(?:%s)\b|\.\.\.|\d+|: |; |^(?:TEMP|PERM) " % "|".join(_PLACEHOLDERS)
    for line in quoted:
        pieces = [p.strip() for p in re.split(splitter, line) if len(re.findall(r"[a-z]", p)) >= 3]
        assert pieces, line
        for piece in pieces:
            assert any(piece in s for s in strings), f"README quotes {line!r}: {piece!r} is in no string of the code"


def test_the_configuration_error_the_readme_quotes_is_what_the_cli_prints(tmp_path):
    from stsmilter import cli

    m = re.search(r"``(stsmilter: configuration error: FILE:LINE: .+?)``", readme_section("When things go wrong"))
    assert m, "README: no quoted configuration error"
    conf = tmp_path / "bad.conf"
    conf.write_text("[milter]\non_violation = bounce\n")
    run = subprocess.run([sys.executable, "-m", "stsmilter", "check-config", "-c", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == cli.EXIT_USAGE and run.stdout == ""
    assert run.stderr == m.group(1).replace("FILE:LINE", f"{conf}:2") + "\n"


def _config_examples():
    """The configuration snippets the docs show: .nf blocks of stsmilter.conf(5) and
    literal blocks of README.rst that start with a [section] line."""
    examples = []
    for block in re.findall(r"^\.nf\n(.*?)^\.fi$", MAN5.read_text(), re.M | re.S):
        if block.startswith("["):
            examples.append(("stsmilter.conf(5)", block.replace("\\-", "-")))
    for block in re.findall(r"::\n\n((?:    .*\n|\n)+)", README.read_text()):
        text = "\n".join(line[4:] for line in block.splitlines())
        if text.startswith("["):
            examples.append(("README.rst", text))
    return examples


def test_configuration_examples_in_the_docs_load():
    examples = _config_examples()
    assert {where for where, _text in examples} == {"stsmilter.conf(5)", "README.rst"}
    for where, text in examples:
        config.loads(text, where)  # a ConfigError names the example and its line


def schema_ranges():
    """{(section, key): (lo, hi)} as the converters state them in their error message."""
    ranges = {}
    for section, keys in config.SCHEMA.items():
        for key, (convert, _default) in keys.items():
            try:
                convert("not a number")
            except ValueError as e:
                m = re.search(r"(whole number|number of seconds) from (\S+) to (\S+)$", str(e))
                if m:
                    ranges[(section, key)] = m.groups()
    return ranges


def test_ranges_in_the_sample_and_man5_are_the_schema_ranges():
    """What etc/stsmilter.conf's comment and stsmilter.conf(5) give as a key's range
    ("(0.05-60)", "(seconds, 0.05\\(en60)") is what the file is checked against."""
    ranges = schema_ranges()
    assert len(ranges) >= 15
    comments = {}
    section, block = None, []
    for line in SAMPLE.read_text().splitlines():
        if re.fullmatch(r"\[(\w+)\]", line):
            section, block = line.strip("[]"), []
        elif line.startswith("#"):
            block.append(line[1:])
        elif "=" in line:
            comments[(section, line.split("=")[0].strip())] = " ".join(" ".join(block).split())
            block = []
    man = MAN5.read_text()
    for (section, key), (kind, lo, hi) in ranges.items():
        assert f"({lo}-{hi}" in comments[(section, key)], f"etc/stsmilter.conf [{section}] {key}: no ({lo}-{hi})"
        entry = man.split(f".SS [{section}]", 1)[1].split(f'.B "{key} =', 1)[1].split(".TP", 1)[0]
        word = {"whole number": "integer", "number of seconds": "seconds"}[kind]
        assert f"\n.RI ( {word} ,\n{lo}\\(en{hi})" in entry, \
            f"stsmilter.conf(5) [{section}] {key}: not ({word}, {lo}-{hi})"


# --- [socketmap NAME] sections --------------------------------------------------------


def test_man5_documents_the_map_sections_keys():
    lines = man_section(MAN5, "KEYS")
    start = lines.index('.SS "[socketmap NAME]"')
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(".SS"))
    tags = [lines[i + 1] for i in range(start, end) if lines[i] in (".TP", ".TQ")]
    assert tags == [f".B {key}" for key in config.MAP_KEYS]
    assert all(key in config.SCHEMA[config.MAP_SECTION] for key in config.MAP_KEYS)


def test_sample_shows_a_map_section_that_loads():
    text = SAMPLE.read_text()
    assert "Its keys: " + ", ".join(config.MAP_KEYS[:3]) in " ".join(sample_comments().split())
    example = [line[1:] for line in text.splitlines() if line.startswith("#[socketmap ") or
               (line.startswith("#") and re.fullmatch(r"#\w+ = \S+", line))]
    assert example == ["[socketmap strict]", "strict_testing = yes"]
    assert config.loads("\n".join(example) + "\n").maps == {"strict": {"strict_testing": True}}
