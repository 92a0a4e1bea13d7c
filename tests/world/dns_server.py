"""A real authoritative DNS server on loopback (UDP and TCP, one port) for integration tests.

The zone lives in memory and may be changed while the server runs. Misbehaviour
(SERVFAIL, REFUSED, silence, slowness) can be switched on per query name, and every
query received is logged so tests can assert what the client actually asked.

sign(apex) makes everything at and below apex a DNSSEC-signed zone (world/dnssec.py):
queries with the DO bit get RRSIGs, and NSEC proofs for negative answers, computed when
asked, so records added later are signed too. Validation needs a resolver given the
key's trust anchor (world/unbound.py).
"""

import socket
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from world.dnssec import ZoneKey, nsec_proof

SUPPORTED_TYPES = ("TXT", "MX", "A", "AAAA", "CNAME", "SOA", "TLSA", "NS")
UDP_DEFAULT_LIMIT = 512  # RFC 1035 §4.2.1, for clients without EDNS
MAX_CNAME_CHAIN = 8
POLL_SECONDS = 0.1  # how often blocking loops look at the stop flag


def _name(name):
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name)


def _log_name(name):
    return name.to_text(omit_final_dot=True).lower()


def _txt_rdata(value):
    """One TXT RR: a str/bytes is split into 255-octet strings (as a zone file must), a list is taken as is."""
    if isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        strings = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    else:
        strings = [s.encode() if isinstance(s, str) else s for s in value]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


class DnsServer:
    def __init__(self, address="127.0.0.1"):
        self.address = address
        self.port = None
        self.queries = []  # (qname, rtype, transport)
        self.errors = []  # exceptions raised while answering: a bug in this server, not a test result
        self._lock = threading.Lock()
        self._records = {}  # (dns.name.Name, rdtype) -> (ttl, [rdata])
        self._faults = {}  # (dns.name.Name, rdtype or None for all) -> "servfail" | "refuse" | "drop"
        self._delays = {}  # (dns.name.Name, rdtype or None for all) -> seconds
        self._zone_keys = {}  # signed apex (dns.name.Name) -> ZoneKey
        self._stopping = threading.Event()
        self._threads = []
        self._udp = self._tcp = None

    # -- zone -------------------------------------------------------------------------

    def add(self, name, rtype, value, ttl=300):
        rdtype = dns.rdatatype.from_text(rtype.upper())
        if dns.rdatatype.to_text(rdtype) not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported type {rtype}")
        if rdtype == dns.rdatatype.TXT:
            rdata = _txt_rdata(value)
        else:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False)
        key = (_name(name), rdtype)
        with self._lock:
            _, rdatas = self._records.get(key, (ttl, []))
            self._records[key] = (ttl, rdatas + [rdata])

    def remove(self, name, rtype=None):
        name = _name(name)
        with self._lock:
            for key in [k for k in self._records if k[0] == name]:
                if rtype is None or key[1] == dns.rdatatype.from_text(rtype.upper()):
                    del self._records[key]

    def clear(self):
        with self._lock:
            self._records.clear()
            self._faults.clear()
            self._delays.clear()
            self._zone_keys.clear()

    # -- DNSSEC -------------------------------------------------------------------------

    def sign(self, apex, ttl=300):
        """Sign the zone at apex (a SOA is added if it has none); returns its ZoneKey,
        whose trust_anchor() a validating resolver needs."""
        key = ZoneKey(apex, ttl)
        soa = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.SOA,
                                  f"ns.{key.apex} hostmaster.{key.apex} 1 3600 600 86400 60")
        with self._lock:
            self._records.setdefault((key.apex, dns.rdatatype.SOA), (ttl, [soa]))
            self._records[(key.apex, dns.rdatatype.DNSKEY)] = (ttl, [key.dnskey])
            self._zone_keys[key.apex] = key
        return key

    def _zone_key(self, name):
        signed = [apex for apex in self._zone_keys if name.is_subdomain(apex)]
        return self._zone_keys[max(signed, key=len)] if signed else None

    def _add_dnssec(self, response, qname, rdtype, rcode):
        """RRSIGs for every signed RRset, and NSEC proofs for a signed negative answer."""
        name = qname
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.CNAME:
                name = rrset[0].target
        negative = not any(rrset.rdtype == rdtype for rrset in response.answer)
        key = self._zone_key(name)
        if negative and key is not None:
            owners = {}
            for owner, owner_type in self._records:
                if owner.is_subdomain(key.apex) and self._zone_key(owner) is key:
                    owners.setdefault(owner, set()).add(owner_type)
            response.authority += nsec_proof(owners, key.apex, name, rcode == dns.rcode.NXDOMAIN)
        for section in (response.answer, response.authority):
            signed = []
            for rrset in section:
                signed.append(rrset)
                owner_key = self._zone_key(rrset.name)
                if owner_key is not None:
                    signed.append(owner_key.rrsig(rrset))
            section[:] = signed

    # -- misbehaviour (per query name; optionally only for one type) -------------------

    def servfail(self, name, rtype=None):
        self._set_fault(name, rtype, "servfail")

    def refuse(self, name, rtype=None):
        self._set_fault(name, rtype, "refuse")

    def drop(self, name, rtype=None):
        """Never answer (the client times out)."""
        self._set_fault(name, rtype, "drop")

    def delay(self, name, seconds, rtype=None):
        self._set_fault(name, rtype, seconds, self._delays)

    def behave(self, name):
        """Undo servfail/refuse/drop/delay for a name, every type."""
        name = _name(name)
        with self._lock:
            for table in (self._faults, self._delays):
                for key in [k for k in table if k[0] == name]:
                    del table[key]

    def _set_fault(self, name, rtype, fault, table=None):
        rdtype = dns.rdatatype.from_text(rtype.upper()) if rtype else None
        with self._lock:
            (self._faults if table is None else table)[(_name(name), rdtype)] = fault

    @staticmethod
    def _lookup_fault(table, qname, rdtype):
        return table.get((qname, rdtype), table.get((qname, None)))

    # -- query log --------------------------------------------------------------------

    def count(self, name, rtype=None):
        name = name.lower().rstrip(".")
        with self._lock:
            return sum(1 for q in self.queries if q[0] == name and (rtype is None or q[1] == rtype.upper()))

    def reset_log(self):
        with self._lock:
            self.queries.clear()

    # -- answering --------------------------------------------------------------------

    def _exists(self, name):
        # Empty non-terminals exist too (RFC 8020): any record at or below the name.
        return any(owner.is_subdomain(name) for owner, _ in self._records)

    def _soa_for(self, name):
        for depth in range(len(name)):
            ancestor = name.split(len(name) - depth)[1]
            if (ancestor, dns.rdatatype.SOA) in self._records:
                return self._rrset(ancestor, dns.rdatatype.SOA)
        return None

    def _rrset(self, name, rdtype):
        ttl, rdatas = self._records[(name, rdtype)]
        return dns.rrset.from_rdata_list(name, ttl, rdatas)

    def _resolve(self, qname, rdtype):
        """(rcode, answer rrsets, authority rrsets), following CNAMEs inside the zone."""
        answer, name = [], qname
        with self._lock:
            for _ in range(MAX_CNAME_CHAIN):
                if (name, rdtype) in self._records:
                    return dns.rcode.NOERROR, answer + [self._rrset(name, rdtype)], []
                if (name, dns.rdatatype.CNAME) not in self._records:
                    break
                cname = self._rrset(name, dns.rdatatype.CNAME)
                answer.append(cname)
                name = cname[0].target
            rcode = dns.rcode.NOERROR if self._exists(name) else dns.rcode.NXDOMAIN
            soa = self._soa_for(name)
            return rcode, answer, [soa] if soa is not None else []

    def _handle(self, wire, transport):
        """The response to one query message (wire format), or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((_log_name(qname), dns.rdatatype.to_text(rdtype), transport))
            fault = self._lookup_fault(self._faults, qname, rdtype)
            delay = self._lookup_fault(self._delays, qname, rdtype)
        if delay and self._stopping.wait(delay):
            return None
        if fault == "drop":
            return None
        if fault in ("servfail", "refuse"):
            response.set_rcode(dns.rcode.SERVFAIL if fault == "servfail" else dns.rcode.REFUSED)
            return response.to_wire()
        response.flags |= dns.flags.AA
        rcode, response.answer, response.authority = self._resolve(qname, rdtype)
        response.set_rcode(rcode)
        if query.edns >= 0 and query.ednsflags & dns.flags.DO:
            response.use_edns(0, dns.flags.DO, 1232)
            with self._lock:
                self._add_dnssec(response, qname, rdtype, rcode)
        limit = 65535
        if transport == "udp":
            limit = max(UDP_DEFAULT_LIMIT, query.payload) if query.edns >= 0 else UDP_DEFAULT_LIMIT
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # Like a real server: an empty truncated answer; the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    # -- transport --------------------------------------------------------------------

    def start(self):
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        for _ in range(20):  # the UDP port may be taken for TCP by someone else: pick again
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.address, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.address, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.settimeout(POLL_SECONDS)
            tcp.settimeout(POLL_SECONDS)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise OSError("no free port for UDP and TCP")
        self._spawn(self._serve_udp)
        self._spawn(self._serve_tcp)
        return self

    def stop(self):
        self._stopping.set()
        while True:
            with self._lock:
                threads, self._threads = self._threads, []
            if not threads:
                break
            for thread in threads:
                thread.join(timeout=5)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, name="dns-server", daemon=True)
        with self._lock:
            if self._stopping.is_set():
                return
            self._threads.append(thread)
        thread.start()

    def _serve_udp(self):
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            # One thread per query, so a delayed or dropped name never holds up others.
            self._spawn(self._answer_udp, wire, peer)

    def _handle_safely(self, wire, transport):
        try:
            return self._handle(wire, transport)
        except Exception as e:  # noqa: BLE001 - reported through .errors, answered as SERVFAIL
            with self._lock:
                self.errors.append(e)
            response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
            response.flags = dns.flags.QR
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

    def _answer_udp(self, wire, peer):
        reply = self._handle_safely(wire, "udp")
        if reply is not None and not self._stopping.is_set():
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass

    def _serve_tcp(self):
        while not self._stopping.is_set():
            try:
                conn, _ = self._tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._spawn(self._serve_tcp_connection, conn)

    def _serve_tcp_connection(self, conn):
        with conn:
            conn.settimeout(POLL_SECONDS)
            while True:
                header = self._recv_exactly(conn, 2)
                wire = self._recv_exactly(conn, int.from_bytes(header, "big")) if header else None
                if not wire:
                    return
                reply = self._handle_safely(wire, "tcp")
                if reply is not None:  # a dropped query: keep the connection open, say nothing
                    try:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                    except OSError:
                        return

    def _recv_exactly(self, conn, size):
        """size bytes, or None when the peer closed or the server is stopping."""
        data = b""
        while len(data) < size:
            if self._stopping.is_set():
                return None
            try:
                chunk = conn.recv(size - len(data))
            except socket.timeout:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data
