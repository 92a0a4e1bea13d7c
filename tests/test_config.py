import ipaddress

import pytest

from stsmilter import config


def test_defaults_are_typed():
    cfg = config.defaults()
    assert cfg.milter.socket == "inet:8894@127.0.0.1"
    assert cfg.milter.lookup_timeout == 5.0
    assert cfg.milter.dry_run is False
    assert cfg.milter.socket_mode == 0o660
    assert cfg.scope.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert cfg.scope.skip_mailers == ("local", "virtual", "lmtp", "error", "discard")
    assert cfg.dns.nameservers == ()
    assert cfg.fetch.port == 443
    assert cfg.metrics.listen == config.Listen("inet", host="127.0.0.1", port=9464)
    assert cfg.socketmap.listen == config.Listen("inet", host="127.0.0.1", port=8461)


def test_values_are_converted_once():
    cfg = config.loads(
        "[dns]\nnameservers = 127.0.0.1, ::1\nport = 5353\n"
        "[milter]\ndry_run = yes\non_violation = Reject\n"
        "[scope]\nlocal_domains = Example.ORG.\n"
        "[metrics]\nlisten =\n"
        "[socketmap]\nlisten = unix:/run/stsmilter/socketmap.sock\n"
    )
    assert cfg.dns.nameservers == ("127.0.0.1", "::1")
    assert cfg.dns.port == 5353
    assert cfg.milter.dry_run is True
    assert cfg.milter.on_violation == "reject"
    assert cfg.scope.local_domains == ("example.org",)
    assert cfg.metrics.listen is None
    assert cfg.socketmap.listen == config.Listen("unix", path="/run/stsmilter/socketmap.sock")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[bogus]\nx = 1\n", "t.conf:1: [bogus]: unknown section"),
        ("[milter]\n\nsockett = inet:1@x\n", "t.conf:3: [milter] sockett: unknown key"),
        ("[milter]\non_violation = bounce\n", "t.conf:2: [milter] on_violation = 'bounce': expected one of tempfail, reject, hold"),
        ("[milter]\nnon_smtp = tempfail\n", "t.conf:2: [milter] non_smtp = 'tempfail': expected one of accept, hold"),
        ("[dns]\nport = 99999\n", "expected a whole number from 1 to 65535"),
        ("[dns]\nnameservers = resolver.example\n", "expected a list of IP addresses"),
        ("[milter]\nsocket = tcp:25\n", "expected inet:PORT@HOST"),
        ("[milter]\ndry_run = maybe\n", "expected yes or no"),
        ("[milter]\ndry_run = yes\ndry_run = no\n", "t.conf:3: [milter] dry_run: set twice"),
        ("dry_run = yes\n", "t.conf:1: a [section] header must come first"),
        ("[metrics]\nlisten = unix:/x\n", "expected HOST:PORT"),
        ("[cache]\nrefresh_interval = 1e9\n", "expected a number of seconds from 60 to 31557600"),
        # stsmilter.conf(5): "Paths must be absolute"
        ("[daemon]\nuser =\npidfile = stsmilter.pid\n", "t.conf:3: [daemon] pidfile: expected an absolute path or empty"),
        ("[fetch]\n\nca_file = ca.pem\n", "t.conf:3: [fetch] ca_file: expected an absolute path"),
        ("[cache]\npath = cache.sqlite\n", "t.conf:2: [cache] path: expected an absolute path or empty"),
    ],
)
def test_bad_config_names_file_line_key_and_form(text, fragment):
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, "t.conf")
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))
    assert config.load().milter.socket == "inet:8894@127.0.0.1"
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "named.conf"))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:secret@redis.example:6380/2",
                                 "unix:///run/redis/redis.sock?db=1", "REDIS://h:1/0"])
def test_a_redis_url_redis_py_accepts(url):
    assert config.loads(f"[cache]\nredis = {url}\n").cache.redis == url


@pytest.mark.parametrize("text, fragment", [
    ("[cache]\nredis = http://127.0.0.1:6379/0\n", "[cache] redis = 'http://127.0.0.1:6379/0': expected redis://"),
    ("[cache]\nredis = 127.0.0.1:6379\n", "[cache] redis"),
    ("[cache]\nredis = redis://\n", "[cache] redis"),
    ("[cache]\nredis = redis://a b:1/0\n", "[cache] redis"),
    ("[cache]\nredis_prefix =\n", "[cache] redis_prefix = '': expected 1 to 64"),
    ("[cache]\nredis_prefix = a b\n", "[cache] redis_prefix"),
    ("[cache]\nredis_prefix = " + "x" * 65 + "\n", "[cache] redis_prefix"),
    ("[cache]\nredis_timeout = 0\n", "[cache] redis_timeout = '0': expected a number of seconds from 0.05 to 10"),
])
def test_a_bad_redis_setting_names_its_key(text, fragment):
    with pytest.raises(config.ConfigError) as e:
        config.loads(text, "t.conf")
    assert fragment in str(e.value) and str(e.value).startswith("t.conf:2: ")


def test_socketmap_only_and_milter_only():
    assert config.loads("[milter]\nsocket =\n").milter.socket == ""
    assert config.loads("[socketmap]\nlisten =\n").socketmap.listen is None
    with pytest.raises(config.ConfigError) as e:
        config.loads("[socketmap]\nlisten =\n[milter]\n\nsocket =\n", "t.conf")
    assert str(e.value) == ("t.conf:5: [milter] socket and [socketmap] listen are both empty: nothing to serve"
                            " (set at least one)")


def test_map_sections_keep_what_they_set_typed_in_file_order():
    cfg = config.loads("[socketmap  strict]\nstrict_testing = yes\nlookup_timeout = 2.5\n"
                       "[socketmap]\nstrict_testing = no\n[socketmap lmtp.b-c_1]\n"
                       "on_timeout = NotFound\ndane = no\ntlsrpt = yes\n", "t.conf")
    assert cfg.maps == {"strict": {"strict_testing": True, "lookup_timeout": 2.5},
                        "lmtp.b-c_1": {"on_timeout": "notfound", "dane": "no", "tlsrpt": True}}
    assert list(cfg.maps) == ["strict", "lmtp.b-c_1"]
    assert cfg.socketmap.strict_testing is False  # [socketmap] is not changed by a section
    assert cfg.map_where("strict", "lookup_timeout") == "t.conf:3" and cfg.map_where("strict") == "t.conf:1"
    assert config.defaults().maps == {}


@pytest.mark.parametrize("text, message", [
    ("[socketmap strict]\n\nlisten = inet:127.0.0.1:1\n",
     "t.conf:3: [socketmap strict] listen: unknown key (keys of [socketmap strict]: strict_testing,"
     " lookup_timeout, on_timeout, dane, tlsrpt; the others are [socketmap]'s alone)"),
    ("[socketmap strict]\nstrict_testing = perhaps\n",
     "t.conf:2: [socketmap strict] strict_testing = 'perhaps': expected yes or no"),
    ("[socketmap strict]\nlookup_timeout = 0\n",
     "t.conf:2: [socketmap strict] lookup_timeout = '0': expected a number of seconds from 0.05 to 60"),
    ("[milter]\n[socketmap a:b]\n",
     "t.conf:2: [socketmap a:b]: expected [socketmap NAME] with NAME 1 to 64 letters, digits or _.-"
     " (the map name the MTA asks for)"),
    ("[socketmap x]\n[socketmap  x]\n", "t.conf:2: [socketmap x]: section appears twice"),
    ("[socketmapx]\n", "t.conf:1: [socketmapx]: unknown section (expected one of [daemon],"),
])
def test_a_bad_map_section_is_one_line_with_file_and_line(text, message):
    with pytest.raises(config.ConfigError) as e:
        config.loads(text, "t.conf")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
