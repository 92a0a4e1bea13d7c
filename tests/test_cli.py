"""The operator commands that do not need the network: check-config and cache list/purge,
run in-process through cli.main() (query and check are covered against real servers in
test_engine_integration.py and test_milter_postfix.py)."""

import json
import re

from pathlib import Path

import pytest

from stsmilter import cli, config
from stsmilter.engine.policy import Policy
from stsmilter.engine.store import SqliteStore, make_entry


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# cli.main() runs in this process: a [daemon] user would make a root test run drop the
# whole pytest process to that user (what the real command does). Subprocess tests of
# the privilege drop are in test_privileges.py.
NO_SERVICE_USER = "[daemon]\nuser =\ngroup =\n"


def write_conf(tmp_path, text):
    path = tmp_path / "s.conf"
    path.write_text(NO_SERVICE_USER + text)
    return str(path)


def test_check_config_prints_every_effective_value(tmp_path, capsys):
    conf = write_conf(tmp_path, "[milter]\non_violation = hold\nsocket_mode = 0640\n[metrics]\nlisten =\n")
    code, out, err = run(capsys, "check-config", "-c", conf)
    assert code == 0, err
    assert f"# effective configuration from {conf}" in out
    assert "on_violation = hold" in out and "socket_mode = 0640" in out
    assert "trusted_networks = 127.0.0.0/8, ::1/128" in out
    # The output is itself a valid configuration with the same values.
    again = config.loads(out, "printed")
    assert list(again.items()) == list(config.load(conf).items())


def test_check_config_prints_the_shipped_file_as_it_is_written(tmp_path, capsys):
    """'the effective value of every key in file form': for etc/stsmilter.conf, whose
    values are the defaults in their documented forms, every line as the file has it.
    (Without a service user, so that this process stays who it is.)"""
    text = (Path(__file__).resolve().parent.parent / "etc" / "stsmilter.conf").read_text()
    text, changed = re.subn(r"(?m)^(user|group) = stsmilter$", r"\1 =", text)
    assert changed == 2
    sample = tmp_path / "stsmilter.conf"
    sample.write_text(text)
    shipped = [line for line in sample.read_text().splitlines() if line and not line.startswith("#")]
    code, out, err = run(capsys, "check-config", "-c", str(sample))
    assert code == 0, err
    printed = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert printed == shipped


def test_check_config_rejects_a_bad_file_with_one_line(tmp_path, capsys):
    conf = write_conf(tmp_path, "[cache]\nmax_entries = lots\n")
    code, out, err = run(capsys, "check-config", "-c", conf)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "max_entries" in err and "expected a whole number" in err


@pytest.fixture
def filled_cache(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    store = SqliteStore(path)
    policy = Policy("STSv1", "enforce", 86400, ("mx.a.example", "*.b.example"))
    store.put(make_entry("a.example", "id1", policy, fetched_at=1_700_000_000.0))
    store.put(make_entry("c.example", "id2", Policy("STSv1", "none", 600, ()), 1_700_000_000.0,
                         refresh_failures=3, last_error="sts-webpki-invalid"))
    store.close()
    return write_conf(tmp_path, f"[cache]\npath = {path}\n")


def test_cache_list(filled_cache, capsys):
    code, out, err = run(capsys, "cache", "list", "--json", "-c", filled_cache)
    assert code == 0 and err == "2 cached policies\n"  # with --json too, stderr says where they are from
    rows = json.loads(out)
    assert [r["domain"] for r in rows] == ["a.example", "c.example"]
    assert rows[0]["mx"] == ["mx.a.example", "*.b.example"] and rows[0]["expires"] == "2023-11-15T22:13:20+00:00"
    assert (rows[1]["refresh_failures"], rows[1]["last_error"]) == (3, "sts-webpki-invalid")
    code, out, err = run(capsys, "cache", "list", "-c", filled_cache)
    assert "c.example id=id2 mode=none" in out and "refresh failing x3 (sts-webpki-invalid)" in out
    assert "2 cached policies" in err


def test_cache_purge(filled_cache, capsys):
    assert run(capsys, "cache", "purge", "-c", filled_cache, "A.Example.")[:2] == (0, "purged 1 policy\n")
    code, out, _ = run(capsys, "cache", "list", "--json", "-c", filled_cache)
    assert [r["domain"] for r in json.loads(out)] == ["c.example"]
    assert run(capsys, "cache", "purge", "-c", filled_cache, "--all")[:2] == (0, "purged 1 policy\n")
    code, _, err = run(capsys, "cache", "purge", "-c", filled_cache)
    assert code == 2 and "--all" in err


@pytest.mark.parametrize("pidfile", ["run/s.pid", ""])
def test_cache_purge_says_when_no_daemon_was_told(filled_cache, tmp_path, capsys, pidfile):
    """stsmilter(8): "A line on standard error says who was told": also that nobody was
    (a daemon run with another [daemon] pidfile would go on serving the purged policy)."""
    conf = tmp_path / "p.conf"
    pidfile = f"{tmp_path}/{pidfile}" if pidfile else ""
    conf.write_text(f"[daemon]\nuser =\ngroup =\npidfile = {pidfile}\n[cache]\npath = {tmp_path}/cache.sqlite\n")
    code, out, err = run(capsys, "cache", "purge", "-c", str(conf), "a.example")
    assert (code, out) == (0, "purged 1 policy\n")
    assert err == (f"stsmilter: no daemon was told: none answers on {tmp_path}/run/s.ctl\n" if pidfile else
                   "stsmilter: no daemon was told: [daemon] pidfile is empty, so no daemon has a control socket\n")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["query"], ["cache"], ["check", "-c"]])
def test_usage_errors_exit_2_with_one_line(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.strip() and err.count("\n") == 1


def test_config_option_before_the_command_works_like_after_it(tmp_path, capsys, filled_cache):
    conf = str(tmp_path / "hold.conf")  # filled_cache wrote s.conf
    (tmp_path / "hold.conf").write_text(NO_SERVICE_USER + "[milter]\non_violation = hold\n")
    after = run(capsys, "check-config", "-c", conf)
    before = run(capsys, "-c", conf, "check-config")
    assert after == before and after[0] == 0 and "on_violation = hold" in after[1]
    # The command's own -c wins over the one before it.
    code, out, _ = run(capsys, "-c", conf, "check-config", "--config", filled_cache)
    assert code == 0 and "on_violation = tempfail" in out
    assert run(capsys, "--config", filled_cache, "cache", "list", "--json")[0] == 0
    code, out, _ = run(capsys, "-c", filled_cache, "cache", "list", "--json")
    assert [r["domain"] for r in json.loads(out)] == ["a.example", "c.example"]


def test_check_config_quiet_prints_nothing_for_a_good_file_and_the_error_for_a_bad_one(tmp_path, capsys):
    good = write_conf(tmp_path, "[milter]\non_violation = hold\n")
    assert run(capsys, "check-config", "-q", "-c", good) == (0, "", "")
    bad = tmp_path / "bad.conf"
    bad.write_text(NO_SERVICE_USER + "[milter]\non_violation = bounce\n")
    code, out, err = run(capsys, "-c", str(bad), "check-config", "--quiet")
    assert code == 2 and out == "" and "bad.conf:5" in err and err.count("\n") == 1
