"""`stsmilter import-config`: postfix-mta-sts-resolver's configuration as a stsmilter.conf
(the answers of both daemons side by side: tests/system/test_resolver_dropin.py)."""

import subprocess
import sys
import textwrap

import pytest

from stsmilter import config
from stsmilter.cli import import_config
from world import paths

PEER_CONFIGS = paths.DATA / "peer-configs"
SHIPPED = sorted(p for p in PEER_CONFIGS.iterdir() if p.name != "README")


def stsmilter(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "stsmilter", *args], capture_output=True, text=True, timeout=60,
                          input=stdin)


def check_config(tmp_path, text):
    """check-config as the daemon's start would run it, as this user (no [daemon] user)."""
    path = tmp_path / "imported.conf"
    path.write_text(text + "[daemon]\nuser =\ngroup =\npidfile =\n")
    return stsmilter("check-config", "-q", "-c", str(path))


def prose(text):
    """The words of the output, comment marks left out (comments wrap anywhere)."""
    return " ".join(word for word in text.split() if word != "#")


def convert(yml, **kwargs):
    text, warnings = import_config.convert(textwrap.dedent(yml), "peer.yml", **kwargs)
    return config.loads(text, "imported.conf"), text, warnings


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_the_peers_shipped_examples_convert_into_files_check_config_accepts(shipped, tmp_path):
    assert len(SHIPPED) == 7
    result = stsmilter("import-config", str(shipped))
    assert result.returncode == 0, result.stderr
    checked = check_config(tmp_path, result.stdout)
    assert checked.returncode == 0, checked.stderr
    cfg = config.loads(result.stdout)
    assert cfg.milter.socket == ""  # the peer is a socketmap only
    assert cfg.maps.get("myzone", {"strict_testing": False}).get("strict_testing") is False
    assert cfg.socketmap.lookup_timeout == 4 and cfg.socketmap.strict_testing is False
    warned = [line for line in result.stderr.splitlines() if line]
    if shipped.name.endswith(("postgres", "redis_sentinel")):
        assert warned == [f"stsmilter: warning: {shipped}: cache.type = {shipped.name.rsplit('.', 1)[1]}:"
                          " no equivalent; [cache] path, a local file, instead"]
        assert cfg.cache.path == "/var/lib/stsmilter/cache.sqlite" and cfg.cache.redis == ""
    else:
        assert warned == []


def test_listen_from_host_port_or_path_and_mode():
    cfg, _text, _ = convert("host: ::1\nport: 9999\n")
    assert str(cfg.socketmap.listen) == "inet:[::1]:9999"
    cfg, _text, _ = convert("{}")
    assert str(cfg.socketmap.listen) == "inet:127.0.0.1:8461"  # the peer's defaults
    cfg, text, _ = convert("path: /run/mta-sts.sock\nmode: 0666\nhost: 10.0.0.1\n")
    assert str(cfg.socketmap.listen) == "unix:/run/mta-sts.sock" and cfg.socketmap.socket_mode == 0o666
    cfg, text, _ = convert("mode: 0666\n")
    assert "# mode = 438: the peer uses it only with path; not converted." in text
    cfg, _text, _ = convert("path: /run/mta-sts.sock\n", listen="inet:127.0.0.1:8462")
    assert str(cfg.socketmap.listen) == "inet:127.0.0.1:8462" and cfg.socketmap.socket_mode == 0o660


def test_zones_become_map_sections_with_the_peers_own_zone_defaults():
    """A zone does not inherit default_zone in the peer: what it leaves out is the peer's
    default (timeout 4, strict_testing false), written out in its section."""
    cfg, text, warnings = convert("""
        default_zone:
          strict_testing: true
          timeout: 10
          tlsrpt: true
        zones:
          strict:
            strict_testing: true
            timeout: 2
          plain: {}
          "bad name": {strict_testing: true}
    """)
    assert (cfg.socketmap.strict_testing, cfg.socketmap.lookup_timeout, cfg.socketmap.tlsrpt) == (True, 10, True)
    assert cfg.maps == {"strict": {"strict_testing": True, "lookup_timeout": 2.0, "tlsrpt": False},
                        "plain": {"strict_testing": False, "lookup_timeout": 4.0, "tlsrpt": False}}
    assert warnings == ["peer.yml: zones.bad name: not a map name stsmilter accepts; not converted"]
    assert "# zones.bad name: not a map name stsmilter accepts" in text


def test_caches():
    cfg, text, _ = convert("cache: {type: internal, options: {cache_size: 50}}\n")
    assert cfg.cache.max_entries == 100 and "outside 100 to 10000000" in prose(text)  # clamped, and said so
    cfg, text, _ = convert("cache: {type: sqlite, options: {filename: /var/lib/mta-sts/cache.db, threads: 4}}\n")
    assert cfg.cache.path == "/var/lib/stsmilter/cache.sqlite"  # never the peer's file: another format
    assert "/var/lib/mta-sts/cache.db is another format and is left alone" in prose(text)
    assert "# cache.options.threads = 4: no equivalent" in text
    cfg, text, warnings = convert("""
        cache:
          type: redis
          options:
            url: "rediss://:secret@redis.example:6380/2"
            socket_timeout: 30
            ssl_cert_reqs: required
    """)
    assert cfg.cache.redis == "rediss://:secret@redis.example:6380/2" and cfg.cache.redis_timeout == 10
    assert warnings == ["peer.yml: cache.options.ssl_cert_reqs: not converted"]
    assert "required" not in text  # option values (credentials) stay out of comments


def test_refresh_and_cache_grace():
    cfg, _text, _ = convert("proactive_policy_fetching: {enabled: true, interval: 3600, grace_ratio: 2}\n"
                            "cache_grace: 30\n")
    assert cfg.cache.refresh_interval == 3600
    assert (cfg.cache.id_check_interval, cfg.cache.id_check_min_interval) == (30, 30)
    cfg, text, _ = convert("proactive_policy_fetching: {enabled: false, interval: 3600}\n")
    assert cfg.cache.refresh_interval == 86400 and cfg.cache.id_check_interval == 60
    assert "stsmilter always refreshes cached policies" in prose(text)


def test_unknown_keys_are_named_never_dropped(tmp_path):
    path = tmp_path / "peer.yml"
    path.write_text("port: 8461\nlisten_backlog: 5\ndefault_zone: {timeout: 4, retries: 3}\n"
                    "zones: {z: {strict: yes}}\ncache: {type: internal, size: 5}\n"
                    "proactive_policy_fetching: {every: 60}\nshutdown_timeout: 20\nreuse_port: true\n")
    result = stsmilter("import-config", str(path))
    assert result.returncode == 0, result.stderr
    for where in ("listen_backlog", "default_zone.retries", "zones.z.strict", "cache.size",
                  "proactive_policy_fetching.every"):
        assert f"stsmilter: warning: {path}: {where}: unknown key, not converted\n" in result.stderr
        assert f"# {where} = " in result.stdout
    for where in ("shutdown_timeout = 20: no equivalent", "reuse_port = true: no equivalent"):
        assert f"# {where}" in result.stdout
    assert check_config(tmp_path, result.stdout).returncode == 0


@pytest.mark.parametrize("yml, message", [
    ("port: [1\n", "import-config: {f}:2: not YAML: "),
    ("- a\n", "import-config: {f}: the file: expected a mapping"),
    ("port: 99999\n", "import-config: {f}: host/port: inet:127.0.0.1:99999: expected inet:HOST:PORT or unix:/PATH"
                      " with PORT from 1 to 65535"),
    ("cache: {type: memcached}\n", "import-config: {f}: cache.type = memcached: expected one of internal, sqlite,"
                                   " redis, redis_sentinel, postgres"),
    ("cache: {type: redis, options: {url: 'http://x'}}\n", "import-config: {f}: cache.options.url = http://x:"
                                                          " expected redis://"),
    ("default_zone: {timeout: soon}\n", "import-config: {f}: default_zone.timeout = soon: expected a number"),
])
def test_a_file_that_cannot_be_converted_is_one_line_and_exit_2(tmp_path, yml, message):
    path = tmp_path / "peer.yml"
    path.write_text(yml)
    result = stsmilter("import-config", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("stsmilter: " + message.format(f=path)), result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_file_and_bad_listen_are_usage_errors(tmp_path):
    result = stsmilter("import-config", str(tmp_path / "absent.yml"))
    assert (result.returncode, result.stderr) == (
        2, f"stsmilter: import-config: {tmp_path}/absent.yml: cannot read: No such file or directory\n")
    result = stsmilter("import-config", "--listen", "8462", str(SHIPPED[0]))
    assert result.returncode == 2 and "--listen 8462: expected inet:HOST:PORT" in result.stderr


def test_yaml_is_imported_by_import_config_only():
    """The daemon and the other commands never need PyYAML (Debian: python3-yaml, a
    Recommends): importing them, and everything the daemon loads, leaves it out."""
    code = ("import sys; import stsmilter.cli; from stsmilter.service import daemon; daemon.import_everything();"
            " print('yaml' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
