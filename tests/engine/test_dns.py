"""stsmilter.dns against a real authoritative server on loopback (tests/world/dns_server.py)."""

import socket
import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.dns import MxSet, NoRecord, Resolver, TempDnsError, TxtSet
from world.dns_server import DnsServer
from world.sync import Sync

pytestmark = pytest.mark.integration

SOA = "ns.example.com. hostmaster.example.com. 1 3600 600 86400 60"


def timed(call, *args, **kwargs):
    """(seconds, outcome): outcome is what call returned, or the exception it raised."""
    start = time.monotonic()
    try:
        outcome = call(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - returned to the test for inspection
        outcome = e
    return time.monotonic() - start, outcome


# -- TXT --------------------------------------------------------------------------------


def test_txt_single_string(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=20240101")
    assert resolver.txt("_mta-sts.example.com").records == ("v=STSv1; id=20240101",)
    assert resolver.txt("_MTA-STS.Example.COM.").records == ("v=STSv1; id=20240101",)


def test_txt_strings_of_one_record_are_joined_without_spaces(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", ["v=STSv1; ", "id=", "42"])
    assert resolver.txt("_mta-sts.example.com").records == ("v=STSv1; id=42",)


def test_txt_one_str_per_record(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=1")
    dns_server.add("_mta-sts.example.com", "TXT", "something else")
    assert sorted(resolver.txt("_mta-sts.example.com").records) == ["something else", "v=STSv1; id=1"]


def test_txt_follows_cname_to_another_domain(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "CNAME", "_mta-sts.provider.net")
    dns_server.add("_mta-sts.provider.net", "TXT", "v=STSv1; id=p1")
    assert resolver.txt("_mta-sts.example.com").records == ("v=STSv1; id=p1",)


def test_txt_carries_the_rrset_ttl(dns_server, resolver):
    # RFC 8461 §3.3/§5.1: the id is re-checked once the record's TTL has passed.
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=1", ttl=1234)
    assert resolver.txt("_mta-sts.example.com") == TxtSet(("v=STSv1; id=1",), 1234)


@pytest.mark.parametrize("cname_ttl, txt_ttl, expected", [(60, 3600, 60), (3600, 120, 120)])
def test_txt_ttl_is_lowered_by_a_cname_on_the_way(dns_server, resolver, cname_ttl, txt_ttl, expected):
    dns_server.add("_mta-sts.example.com", "CNAME", "_mta-sts.provider.net", ttl=cname_ttl)
    dns_server.add("_mta-sts.provider.net", "TXT", "v=STSv1; id=p1", ttl=txt_ttl)
    assert resolver.txt("_mta-sts.example.com").ttl == expected


def test_txt_ttl_with_the_top_bit_set_counts_as_zero(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=1", ttl=2**31 + 7)  # RFC 2181 §8
    assert resolver.txt("_mta-sts.example.com").ttl == 0


def test_txt_non_ascii_bytes_stay_non_ascii(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", b"v=STSv1; id=\xc3\xa9")
    [record] = resolver.txt("_mta-sts.example.com").records
    assert record.startswith("v=STSv1; id=") and not record.isascii()


def test_txt_oversized_rrset_is_refused_as_a_whole(dns_server, resolver):
    for i in range(51):
        dns_server.add("_mta-sts.example.com", "TXT", f"junk {i}")
    with pytest.raises(NoRecord, match="oversized"):
        resolver.txt("_mta-sts.example.com")


def test_nxdomain_and_nodata_are_no_record(dns_server, resolver):
    dns_server.add("example.com", "A", "192.0.2.1")
    with pytest.raises(NoRecord, match="NXDOMAIN"):
        resolver.txt("_mta-sts.example.com")
    with pytest.raises(NoRecord, match="NODATA"):
        resolver.txt("example.com")
    with pytest.raises(NoRecord, match="NXDOMAIN"):  # CNAME to nowhere
        dns_server.add("_mta-sts.example.com", "CNAME", "gone.example.net")
        resolver.txt("_mta-sts.example.com")


def test_invalid_name_is_no_record(resolver):
    with pytest.raises(NoRecord):
        resolver.txt("a" * 64 + ".example.com")


def failures(rtype, error):
    return REGISTRY.get_sample_value("stsmilter_dns_failures_total", {"type": rtype, "error": error}) or 0.0


@pytest.mark.parametrize("fault, message", [("servfail", "SERVFAIL"), ("refuse", "REFUSED")])
def test_error_rcodes_are_temporary_and_fast(dns_server, resolver, fault, message):
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=1")
    getattr(dns_server, fault)("_mta-sts.example.com")
    before = failures("txt", message.lower())
    seconds, outcome = timed(resolver.txt, "_mta-sts.example.com")
    assert isinstance(outcome, TempDnsError) and str(outcome) == message
    assert failures("txt", message.lower()) == before + 1
    assert seconds < 0.5  # an answer, not a timeout
    assert dns_server.count("_mta-sts.example.com", "TXT") == 1  # no SERVFAIL retries


def test_silent_server_times_out_within_the_timeout(dns_server, resolver):
    dns_server.drop("_mta-sts.example.com")
    before = failures("txt", "timeout")
    seconds, outcome = timed(resolver.txt, "_mta-sts.example.com")
    assert isinstance(outcome, TempDnsError) and str(outcome) == "timeout"
    assert failures("txt", "timeout") == before + 1
    assert 0.9 <= seconds < 1.0 + 1
    assert dns_server.count("_mta-sts.example.com") >= 2  # a lost datagram gets a second chance


def test_per_call_lifetime_shorter_than_timeout_is_honoured(dns_server, make_resolver):
    patient = make_resolver(timeout=5.0)
    dns_server.drop("_mta-sts.example.com")
    seconds, outcome = timed(patient.txt, "_mta-sts.example.com", lifetime=0.4)
    assert isinstance(outcome, TempDnsError)
    assert seconds < 0.4 + 0.4  # dnspython's 0.1 s retry backoff may add a little


def test_slow_answer_within_the_timeout_is_used(dns_server, resolver):
    dns_server.add("_mta-sts.example.com", "TXT", "v=STSv1; id=1")
    dns_server.delay("_mta-sts.example.com", 0.3)
    assert resolver.txt("_mta-sts.example.com").records == ("v=STSv1; id=1",)


def test_nobody_listening_is_temporary():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nobody = Sync(Resolver(nameservers=("127.0.0.1",), port=port, timeout=0.3))
    with pytest.raises(TempDnsError):
        nobody.txt("_mta-sts.example.com")


def test_truncated_answer_is_retried_over_tcp(dns_server, resolver):
    big = "v=STSv1; id=1; " + "x" * 2000  # beyond the 1232-byte EDNS payload
    dns_server.add("_mta-sts.example.com", "TXT", big)
    assert resolver.txt("_mta-sts.example.com").records == (big,)
    transports = [t for name, _, t in dns_server.queries if name == "_mta-sts.example.com"]
    assert transports == ["udp", "tcp"]


def test_fifty_threads_share_one_resolver(dns_server, resolver):
    for i in range(50):
        dns_server.add(f"_mta-sts.d{i}.example", "TXT", f"v=STSv1; id={i}")
        dns_server.delay(f"_mta-sts.d{i}.example", 0.1)  # so that all 50 queries are in flight at once
    results, errors = {}, []
    start = threading.Barrier(50)

    def ask(i):
        start.wait()
        try:
            results[i] = resolver.txt(f"_mta-sts.d{i}.example").records
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert results == {i: (f"v=STSv1; id={i}",) for i in range(50)}


# -- MX ---------------------------------------------------------------------------------


def test_mx_sorted_by_preference_then_name(dns_server, resolver):
    for value in ("20 b.mx.example.net.", "10 Z.mx.example.net", "10 a.mx.example.net", "30 a.mx.example.net"):
        dns_server.add("example.com", "MX", value, ttl=600)
    assert resolver.mx("Example.com.") == MxSet(
        hosts=("a.mx.example.net", "z.mx.example.net", "b.mx.example.net"), ttl=600
    )


def test_implicit_mx_when_the_domain_has_no_mx(dns_server, resolver):
    dns_server.add("example.com", "SOA", SOA, ttl=120)
    dns_server.add("mail.example.com", "A", "192.0.2.25")
    assert resolver.mx("mail.example.com") == MxSet(hosts=("mail.example.com",), ttl=60)  # RFC 2308 min


def test_implicit_mx_without_soa_has_default_ttl(dns_server, resolver):
    dns_server.add("example.org", "A", "192.0.2.25")
    assert resolver.mx("example.org") == MxSet(hosts=("example.org",), ttl=300)


def test_mx_of_missing_domain_is_no_record(dns_server, resolver):
    with pytest.raises(NoRecord):
        resolver.mx("nowhere.example")


def test_null_mx(dns_server, resolver):
    dns_server.add("example.com", "MX", "0 .", ttl=900)
    assert resolver.mx("example.com") == MxSet(hosts=(), ttl=900, null_mx=True)


def test_hostile_mx_names_are_dropped(dns_server, resolver):
    for value in ("10 bad!host.example.com", "10 sp\\032ace.example.com", "10 semi\\;colon.example.com",
                  "10 \\195\\169t\\195\\169.example.com", "20 good_one.example.com", "30 ."):
        dns_server.add("example.com", "MX", value)
    assert resolver.mx("example.com").hosts == ("good_one.example.com",)


def test_mx_host_count_is_capped(dns_server, resolver):
    for i in range(70):
        dns_server.add("example.com", "MX", f"{i} mx{i:02}.example.com")
    hosts = resolver.mx("example.com").hosts
    assert hosts == tuple(f"mx{i:02}.example.com" for i in range(64))


def test_mx_servfail_is_temporary(dns_server, resolver):
    dns_server.servfail("example.com")
    before = failures("mx", "servfail")
    with pytest.raises(TempDnsError):
        resolver.mx("example.com")
    assert failures("mx", "servfail") == before + 1


def total_failures():
    return sum(
        sample.value
        for metric in REGISTRY.collect() if metric.name == "stsmilter_dns_failures"
        for sample in metric.samples if sample.name == "stsmilter_dns_failures_total"
    )


def test_answers_without_records_are_not_failures(dns_server, resolver):
    dns_server.add("example.com", "A", "192.0.2.1")
    before = total_failures()
    with pytest.raises(NoRecord):
        resolver.txt("_mta-sts.example.com")  # NXDOMAIN
    with pytest.raises(NoRecord):
        resolver.txt("example.com")  # NODATA
    assert resolver.mx("example.com").hosts == ("example.com",)  # implicit MX
    assert total_failures() == before


# -- addresses --------------------------------------------------------------------------


def test_addresses_a_then_aaaa(dns_server, resolver):
    dns_server.add("mx.example.com", "AAAA", "2001:db8::25")
    dns_server.add("mx.example.com", "A", "192.0.2.25")
    assert resolver.addresses("mx.example.com") == ["192.0.2.25", "2001:db8::25"]


def test_addresses_one_family_failing_is_fine(dns_server, make_resolver):
    resolver = make_resolver(timeout=0.5)
    dns_server.add("mx.example.com", "A", "192.0.2.25")
    dns_server.drop("mx.example.com", "AAAA")
    assert resolver.addresses("mx.example.com") == ["192.0.2.25"]
    dns_server.behave("mx.example.com")
    dns_server.drop("mx.example.com", "A")  # a silent A query must leave time for AAAA
    dns_server.add("mx.example.com", "AAAA", "2001:db8::25")
    seconds, outcome = timed(resolver.addresses, "mx.example.com")
    assert outcome == ["2001:db8::25"] and seconds < 0.5 + 1


def test_addresses_errors(dns_server, resolver):
    dns_server.add("mx.example.com", "MX", "10 other.example.com")
    with pytest.raises(NoRecord):
        resolver.addresses("mx.example.com")  # NODATA for both
    with pytest.raises(NoRecord):
        resolver.addresses("missing.example.com")
    dns_server.add("mx.example.com", "A", "192.0.2.25")
    dns_server.servfail("mx.example.com", "A")
    with pytest.raises(TempDnsError):
        resolver.addresses("mx.example.com")  # A failed, AAAA empty: maybe there is an A


# -- the test server itself -------------------------------------------------------------


def ask(server, name, rtype, tcp=False, **query_options):
    query = dns.message.make_query(name, rtype, **query_options)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, server.address, port=server.port, timeout=2)


def test_server_rcodes_and_aa_flag(dns_server):
    dns_server.add("a.b.example.com", "A", "192.0.2.1")
    found = ask(dns_server, "A.B.example.com", "A")
    assert found.rcode() == dns.rcode.NOERROR and found.flags & dns.flags.AA
    assert [rrset.to_text().lower() for rrset in found.answer] == ["a.b.example.com. 300 in a 192.0.2.1"]
    assert ask(dns_server, "a.b.example.com", "TXT").answer == []  # NODATA
    empty_non_terminal = ask(dns_server, "b.example.com", "A")
    assert empty_non_terminal.rcode() == dns.rcode.NOERROR and empty_non_terminal.answer == []
    assert ask(dns_server, "c.example.com", "A").rcode() == dns.rcode.NXDOMAIN


def test_server_chases_cnames_in_order(dns_server):
    dns_server.add("www.example.com", "CNAME", "web.example.com")
    dns_server.add("web.example.com", "CNAME", "host.example.net")
    dns_server.add("host.example.net", "A", "192.0.2.80")
    answer = ask(dns_server, "www.example.com", "A").answer
    assert [(str(r.name), r.rdtype) for r in answer] == [
        ("www.example.com.", dns.rdatatype.CNAME),
        ("web.example.com.", dns.rdatatype.CNAME),
        ("host.example.net.", dns.rdatatype.A),
    ]


def test_server_truncates_udp_to_512_without_edns(dns_server):
    dns_server.add("big.example.com", "TXT", "y" * 600)
    truncated = ask(dns_server, "big.example.com", "TXT")
    assert truncated.flags & dns.flags.TC and truncated.answer == []
    assert len(ask(dns_server, "big.example.com", "TXT", use_edns=0, payload=1232).answer) == 1
    assert len(ask(dns_server, "big.example.com", "TXT", tcp=True).answer) == 1


def test_server_zone_edits_and_query_log(dns_server):
    dns_server.add("x.example.com", "A", "192.0.2.1")
    dns_server.add("x.example.com", "TXT", "hello")
    dns_server.remove("x.example.com", "A")
    assert ask(dns_server, "x.example.com", "A").answer == []
    dns_server.remove("X.example.com")
    assert ask(dns_server, "x.example.com", "TXT").rcode() == dns.rcode.NXDOMAIN
    assert dns_server.count("x.example.com") == 2 and dns_server.count("X.Example.com.", "txt") == 1
    assert dns_server.queries[0] == ("x.example.com", "A", "udp")
    dns_server.reset_log()
    dns_server.add("y.example.com", "A", "192.0.2.2")
    dns_server.clear()
    assert ask(dns_server, "y.example.com", "A").rcode() == dns.rcode.NXDOMAIN
    assert dns_server.queries == [("y.example.com", "A", "udp")]


def test_server_delay_holds_up_only_its_name(dns_server):
    dns_server.add("slow.example.com", "A", "192.0.2.1")
    dns_server.add("fast.example.com", "A", "192.0.2.2")
    dns_server.delay("slow.example.com", 1.0)
    slow = threading.Thread(target=ask, args=(dns_server, "slow.example.com", "A"))
    slow.start()
    try:
        seconds, outcome = timed(ask, dns_server, "fast.example.com", "A")
        assert outcome.answer and seconds < 0.5
    finally:
        slow.join()


def test_server_stop_releases_port_and_threads():
    before = threading.active_count()
    server = DnsServer().start()
    port = server.port
    server.drop("silent.example.com")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("silent.example.com", "A"), "127.0.0.1", port=port, timeout=0.2)
    server.stop()
    assert threading.active_count() == before
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", port))  # free again
