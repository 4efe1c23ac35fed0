"""DNS sensor: an AF_PACKET socket on all interfaces with a kernel (classic BPF) filter for
"udp port 53 or tcp port 53" over IPv4/IPv6, and a pure parser that turns each packet into a
DnsActivity (query 1 / response 2). It does not reassemble TCP streams (the first segment of a
TCP DNS message is parsed, later ones are ignored) nor follow IPv6 extension headers.

The filter is hand-assembled rather than compiled by scapy because scapy needs tcpdump or
libpcap to compile filters and neither is part of the agent's footprint.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import struct
import threading
import time
from typing import NamedTuple

from agent.sensors.base import Emit, SafeEmitter, Sensor, SensorUnavailable, new_event
from agent.sensors.base import sensor_loss_event
from agent.sensors.community_id import community_id
from agent.sensors.config import NetworkSensorConfig
from agent.sensors.network import read_socket_table, socket_inode_owners
from proto import ringfence_pb2 as pb

logger = logging.getLogger(__name__)


class DnsParseError(ValueError):
    """A packet is not a well-formed DNS message over IP/UDP/TCP."""


# --- classic BPF: "(ip or ip6) and (udp or tcp) and port 53" on cooked (SOCK_DGRAM) packets --

_BPF_LD_W_ABS, _BPF_LD_H_ABS, _BPF_LD_B_ABS = 0x20, 0x28, 0x30
_BPF_LDX_B_MSH, _BPF_LD_H_IND = 0xB1, 0x48
_BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x15, 0x45, 0x06
_SKF_AD_PROTOCOL = 0xFFFFF000  # SKF_AD_OFF + SKF_AD_PROTOCOL: ethertype in host order
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

def _program() -> list[tuple[int, int, int, int]]:
    """Assemble the filter (kept as code so the jump offsets are computed, not hand-counted)."""
    drop, accept = "drop", "accept"
    prog: list[tuple[int | str, int | str, int | str, int]] = [
        (_BPF_LD_W_ABS, 0, 0, _SKF_AD_PROTOCOL),
        (_BPF_JEQ_K, 0, "v6", 0x0800),
        (_BPF_LD_B_ABS, 0, 0, 9),
        (_BPF_JEQ_K, "v4ports", 0, 17),
        (_BPF_JEQ_K, "v4ports", drop, 6),
        ("v4ports", 0, 0, 0),
        (_BPF_LD_H_ABS, 0, 0, 6),
        (_BPF_JSET_K, drop, 0, 0x1FFF),
        (_BPF_LDX_B_MSH, 0, 0, 0),
        (_BPF_LD_H_IND, 0, 0, 0),
        (_BPF_JEQ_K, accept, 0, 53),
        (_BPF_LD_H_IND, 0, 0, 2),
        (_BPF_JEQ_K, accept, drop, 53),
        ("v6", 0, 0, 0),
        (_BPF_JEQ_K, 0, drop, 0x86DD),
        (_BPF_LD_B_ABS, 0, 0, 6),
        (_BPF_JEQ_K, "v6ports", 0, 17),
        (_BPF_JEQ_K, "v6ports", drop, 6),
        ("v6ports", 0, 0, 0),
        (_BPF_LD_H_ABS, 0, 0, 40),
        (_BPF_JEQ_K, accept, 0, 53),
        (_BPF_LD_H_ABS, 0, 0, 42),
        (_BPF_JEQ_K, accept, drop, 53),
        (accept, 0, 0, 0),
        (_BPF_RET_K, 0, 0, 0x40000),
        (drop, 0, 0, 0),
        (_BPF_RET_K, 0, 0, 0),
    ]
    labels: dict[str, int] = {}
    out_index = 0
    for ins in prog:
        if isinstance(ins[0], str):
            labels[ins[0]] = out_index
        else:
            out_index += 1
    out: list[tuple[int, int, int, int]] = []
    for ins in prog:
        if isinstance(ins[0], str):
            continue
        here = len(out)

        def rel(t: int | str) -> int:
            return labels[t] - here - 1 if isinstance(t, str) else t

        op = ins[0]
        assert isinstance(op, int)
        out.append((op, rel(ins[1]), rel(ins[2]), ins[3]))
    return out


def attach_filter(sock: socket.socket) -> None:
    """Attach the DNS filter so the kernel drops everything else before it reaches us."""
    import ctypes

    prog = _program()
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # the kernel copies it


# --- pure parsers -------------------------------------------------------------------------

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 65: "HTTPS", 64: "SVCB", 255: "ANY", 257: "CAA"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class Packet(NamedTuple):
    ip_version: int
    protocol: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    payload: bytes


class DnsMessage(NamedTuple):
    transaction_id: int
    is_response: bool
    rcode: str
    hostname: str
    qtype: str
    answers: list[str]


def parse_ip(pkt: bytes) -> Packet:
    """IPv4/IPv6 + UDP/TCP header parsing of a cooked packet (starts at the IP header)."""
    if len(pkt) < 1:
        raise DnsParseError("empty packet")
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            raise DnsParseError("short IPv4 header")
        ihl = (pkt[0] & 0xF) * 4
        total = struct.unpack_from("!H", pkt, 2)[0]
        proto = pkt[9]
        src, dst = str(ipaddress.IPv4Address(pkt[12:16])), str(ipaddress.IPv4Address(pkt[16:20]))
        body = pkt[ihl:total] if total >= ihl else b""
    elif version == 6:
        if len(pkt) < 40:
            raise DnsParseError("short IPv6 header")
        plen = struct.unpack_from("!H", pkt, 4)[0]
        proto = pkt[6]
        src, dst = str(ipaddress.IPv6Address(pkt[8:24])), str(ipaddress.IPv6Address(pkt[24:40]))
        body = pkt[40:40 + plen]
    else:
        raise DnsParseError(f"IP version {version}")
    if proto == 17:
        if len(body) < 8:
            raise DnsParseError("short UDP header")
        sport, dport = struct.unpack_from("!HH", body)
        return Packet(version, "udp", src, dst, sport, dport, body[8:])
    if proto == 6:
        if len(body) < 20:
            raise DnsParseError("short TCP header")
        sport, dport = struct.unpack_from("!HH", body)
        off = (body[12] >> 4) * 4
        data = body[off:]
        # DNS over TCP: 2-byte length prefix; only a segment starting a message is parsed.
        return Packet(version, "tcp", src, dst, sport, dport, data[2:] if len(data) > 2 else b"")
    raise DnsParseError(f"IP protocol {proto}")


def _name(msg: bytes, off: int) -> tuple[str, int]:
    """Read a (possibly compressed) name; returns (name, offset after it in the record)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if off >= len(msg):
            raise DnsParseError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise DnsParseError("truncated pointer")
            if end < 0:
                end = off + 2
            jumps += 1
            if jumps > 32:
                raise DnsParseError("compression loop")
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        if n & 0xC0:
            raise DnsParseError("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(msg):
            raise DnsParseError("label runs past the message")
        labels.append(msg[off:off + n].decode("ascii", "backslashreplace"))
        off += n
        if sum(len(x) + 1 for x in labels) > 255:
            raise DnsParseError("name too long")
    return ".".join(labels), (end if end >= 0 else off)


def _rdata(msg: bytes, rtype: int, off: int, rdlen: int) -> str:
    rd = msg[off:off + rdlen]
    if rtype == 1 and rdlen == 4:
        return str(ipaddress.IPv4Address(rd))
    if rtype == 28 and rdlen == 16:
        return str(ipaddress.IPv6Address(rd))
    if rtype in (2, 5, 12):
        return _name(msg, off)[0]
    if rtype == 15 and rdlen >= 3:
        return f"{struct.unpack_from('!H', rd)[0]} {_name(msg, off + 2)[0]}"
    if rtype == 16:
        parts, i = [], 0
        while i < len(rd):
            n = rd[i]
            parts.append(rd[i + 1:i + 1 + n].decode("utf-8", "backslashreplace"))
            i += 1 + n
        return " ".join(parts)
    return rd.hex()


def parse_dns(msg: bytes) -> DnsMessage:
    """Header, first question and answer section of a DNS message."""
    if len(msg) < 12:
        raise DnsParseError("short DNS header")
    tid, flags, qd, an = struct.unpack_from("!HHHH", msg)
    off = 12
    hostname, qtype = "", ""
    for i in range(qd):
        name, off = _name(msg, off)
        if off + 4 > len(msg):
            raise DnsParseError("truncated question")
        t = struct.unpack_from("!H", msg, off)[0]
        off += 4
        if i == 0:
            hostname, qtype = name, QTYPES.get(t, str(t))
    answers: list[str] = []
    for _ in range(min(an, 64)):
        _n, off = _name(msg, off)
        if off + 10 > len(msg):
            raise DnsParseError("truncated answer")
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
        off += 10
        if off + rdlen > len(msg):
            raise DnsParseError("rdata runs past the message")
        answers.append(_rdata(msg, rtype, off, rdlen))
        off += rdlen
    return DnsMessage(tid, bool(flags & 0x8000), RCODES.get(flags & 0xF, str(flags & 0xF)),
                      hostname, qtype, answers)


# --- sensor --------------------------------------------------------------------------------


class DnsSensor(Sensor):
    """DNS over an AF_PACKET socket with a kernel filter; mode "packet"."""

    name = "dns"
    mode = "packet"

    def __init__(self, config: NetworkSensorConfig = NetworkSensorConfig()) -> None:
        self._config = config
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except OSError as e:
            raise SensorUnavailable("dns", f"AF_PACKET socket: {e}") from e
        try:
            attach_filter(sock)
        except OSError as e:
            sock.close()
            raise SensorUnavailable("dns", f"attach BPF filter: {e}") from e
        self._sock = sock
        self._queue: queue.Queue[tuple[bytes, int]] = queue.Queue(maxsize=config.dns_queue_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._emitter: SafeEmitter | None = None
        self._dropped = 0
        self._reported = 0
        self._parse_errors = 0
        self._owners: dict[int, int] = {}

    def start(self, emit: Emit) -> None:
        self._emitter = SafeEmitter(emit, "dns")
        self._sock.settimeout(0.2)
        self._threads = [threading.Thread(target=self._recv_loop, name="rf-dns-recv", daemon=True),
                         threading.Thread(target=self._work_loop, name="rf-dns", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=3.0)
        self._sock.close()

    def stats(self) -> dict[str, int]:
        em = self._emitter
        return {"emitted": em.emitted if em else 0, "emit_errors": em.errors if em else 0,
                "lost": self._dropped, "parse_errors": self._parse_errors}

    def _recv_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                logger.warning("dns sensor: recv failed: %s", e)
                time.sleep(0.1)
                continue
            # Loopback shows each packet twice (outgoing and incoming): keep one.
            if addr[0] == "lo" and addr[2] == PACKET_OUTGOING:
                continue
            try:
                self._queue.put_nowait((data, time.time_ns()))
            except queue.Full:
                self._dropped += 1

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, t = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._report_drops()
                continue
            try:
                ev = self.to_event(data, t)
            except DnsParseError:
                self._parse_errors += 1
                continue
            except Exception:
                logger.exception("dns sensor: failed to handle a packet")
                continue
            if ev is not None and self._emitter is not None:
                self._emitter(ev)
            self._report_drops()

    def _report_drops(self) -> None:
        dropped = self._dropped - self._reported
        if dropped > 0 and self._emitter is not None:
            self._reported += dropped
            self._emitter(sensor_loss_event("dns", "queue full", dropped, False))

    def to_event(self, data: bytes, time_ns: int) -> pb.Event | None:
        """DnsActivity for one captured packet (None for TCP segments without a message)."""
        pkt = parse_ip(data)
        if not pkt.payload:
            return None
        msg = parse_dns(pkt.payload)
        ev = new_event(time_ns)
        d = ev.dns
        d.activity_id = 2 if msg.is_response else 1
        d.hostname, d.qtype, d.transaction_id = msg.hostname, msg.qtype, msg.transaction_id
        if msg.is_response:
            d.rcode = msg.rcode
        d.answers.extend(msg.answers)
        d.src_endpoint.ip, d.src_endpoint.port = pkt.src_ip, pkt.src_port
        d.dst_endpoint.ip, d.dst_endpoint.port = pkt.dst_ip, pkt.dst_port
        d.community_id = community_id(pkt.src_ip, pkt.dst_ip, pkt.src_port, pkt.dst_port,
                                      pkt.protocol)
        d.pid = self._pid_for(pkt)
        return ev

    def _pid_for(self, pkt: Packet) -> int:
        """Owner of the local end (client port of a query or response), 0 when unknown."""
        port = pkt.dst_port if pkt.src_port == 53 else pkt.src_port
        for e in read_socket_table():
            if e.protocol == pkt.protocol and e.local_port == port and e.inode:
                if e.inode not in self._owners:
                    self._owners = socket_inode_owners({e.inode})
                return self._owners.get(e.inode, 0)
        return 0

