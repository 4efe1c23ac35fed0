"""Network flow and DNS sensors: pure parsers on canned bytes, then real traffic between two
throwaway network namespaces (198.18.0.0/15 only), always removed."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sensors import dns, network
from agent.sensors.base import SafeEmitter
from agent.sensors.config import NetworkSensorConfig
from agent.sensors.dns import DnsParseError, parse_dns, parse_ip
from agent.sensors.network import parse_proc_net
from proto import ringfence_pb2 as pb

TCP4 = (b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        b"timeout inode\n"
        b"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0  "
        b"      0 12345 1 0000000000000000 100 0 0 10 0\n"
        b"   1: 010012C6:A3F2 020012C6:1F90 01 00000000:00000000 00:00000000 00000000  1000  "
        b"      0 67890 1 0000000000000000 20 4 30 10 -1\n"
        b"   2: garbage\n")
TCP6 = (b"  sl  local_address                         remote_address                        st "
        b"tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        b"   0: B80D0120000000000000000001000000:D431 B80D0120000000000000000002000000:0035 01 "
        b"00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000\n")


def test_parse_proc_net_v4_and_v6() -> None:
    listen, est = parse_proc_net(TCP4, "tcp")
    assert (listen.local_ip, listen.local_port, listen.state, listen.inode) == (
        "127.0.0.1", 8080, network.TCP_LISTEN, 12345)
    assert (est.local_ip, est.local_port, est.remote_ip, est.remote_port, est.uid) == (
        "198.18.0.1", 0xA3F2, "198.18.0.2", 8080, 1000)
    (v6,) = parse_proc_net(TCP6, "tcp")
    assert (v6.local_ip, v6.remote_ip, v6.remote_port) == ("2001:db8::1", "2001:db8::2", 53)


def _dns_query(tid: int, name: bytes, qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\0"
    return struct.pack("!HHHHHH", tid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def _dns_response(query: bytes, answers: list[bytes], rcode: int = 0) -> bytes:
    tid = struct.unpack_from("!H", query)[0]
    head = struct.pack("!HHHHHH", tid, 0x8180 | rcode, 1, len(answers), 0, 0)
    body = query[12:]
    for a in answers:  # name as a pointer to the question (offset 12)
        body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + a
    return head + body


def test_parse_dns_query_and_compressed_response() -> None:
    q = _dns_query(0xBEEF, b"c2.example.test")
    m = parse_dns(q)
    assert (m.transaction_id, m.is_response, m.hostname, m.qtype) == (
        0xBEEF, False, "c2.example.test", "A")
    r = parse_dns(_dns_response(q, [bytes([198, 18, 0, 53]), bytes([198, 18, 0, 54])]))
    assert r.is_response and r.rcode == "NOERROR"
    assert r.answers == ["198.18.0.53", "198.18.0.54"]
    nx = parse_dns(_dns_response(q, [], rcode=3))
    assert nx.rcode == "NXDOMAIN" and nx.answers == []


def test_parse_dns_matches_scapy() -> None:
    from scapy.layers.dns import DNS, DNSQR, DNSRR

    raw = bytes(DNS(id=7, qr=1, qd=DNSQR(qname="www.example.test", qtype="AAAA"),
                    an=DNSRR(rrname="www.example.test", type="AAAA", rdata="2001:db8::7")))
    m = parse_dns(raw)
    assert (m.transaction_id, m.hostname, m.qtype, m.answers) == (
        7, "www.example.test", "AAAA", ["2001:db8::7"])


@pytest.mark.parametrize("raw", [
    b"\x00\x01",                                                     # short header
    struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c",          # pointer to itself
    struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x3fabc",           # label past the end
    struct.pack("!HHHHHH", 1, 0x8000, 1, 1, 0, 0) + b"\0\0\1\0\1" + b"\0" * 4,  # cut answer
])
def test_hostile_dns_raises_typed_error(raw: bytes) -> None:
    with pytest.raises(DnsParseError):
        parse_dns(raw)


def _udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src,
                       dst) + udp


def test_parse_ip_v4_udp_and_v6_udp() -> None:
    q = _dns_query(1, b"a.test")
    pkt = parse_ip(_udp4(bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 40000, 53, q))
    assert (pkt.src_ip, pkt.dst_ip, pkt.src_port, pkt.dst_port, pkt.payload) == (
        "198.18.0.1", "198.18.0.2", 40000, 53, q)
    udp = struct.pack("!HHHH", 5353, 53, 8 + len(q), 0) + q
    v6 = (struct.pack("!IHBB", 0x60000000, len(udp), 17, 64)
          + bytes.fromhex("20010db8000000000000000000000001")
          + bytes.fromhex("20010db8000000000000000000000002") + udp)
    p6 = parse_ip(v6)
    assert (p6.ip_version, p6.src_ip, p6.dst_port) == (6, "2001:db8::1", 53)
    with pytest.raises(DnsParseError):
        parse_ip(b"\x45\x00")


def test_bpf_program_jumps_stay_in_bounds() -> None:
    prog = dns._program()
    assert prog[-2] == (0x06, 0, 0, 0x40000) and prog[-1] == (0x06, 0, 0, 0)
    for i, (op, jt, jf, _k) in enumerate(prog):
        if op & 0x07 == 0x05:  # BPF_JMP: both targets inside the program, forward only
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
        else:
            assert jt == jf == 0
    assert prog[-2][0] == prog[-1][0] == 0x06  # ends in accept, drop


# --- real traffic in throwaway namespaces --------------------------------------------------

SERVER = textwrap.dedent("""
    import socket, struct, time, select
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("198.18.0.2", 8080)); t.listen(4)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("198.18.0.2", 53))
    print("ready", flush=True)
    held = []
    end = time.monotonic() + 15
    while time.monotonic() < end:
        r, _, _ = select.select([t, u], [], [], 0.2)
        if t in r:
            held.append(t.accept()[0])
        if u in r:
            q, addr = u.recvfrom(512)
            tid = q[:2]
            ans = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([198, 18, 0, 53])
            u.sendto(tid + b"\\x81\\x80\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x00" + q[12:] + ans,
                     addr)
""")

CLIENT = textwrap.dedent("""
    import socket, struct, sys, time, threading
    from agent.sensors.config import NetworkSensorConfig
    from agent.sensors.network import NetworkSensor
    from agent.sensors.dns import DnsSensor
    events, lock = [], threading.Lock()
    def emit(ev):
        with lock:
            events.append(ev.SerializeToString().hex())
    cfg = NetworkSensorConfig(poll_interval_s=0.1)
    net, dns = NetworkSensor(cfg), DnsSensor(cfg)
    net.start(emit); dns.start(emit)
    time.sleep(0.3)
    c = socket.create_connection(("198.18.0.2", 8080), timeout=3)
    time.sleep(0.5)
    c.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
    u.connect(("198.18.0.2", 53))
    name = sys.argv[1].encode()
    q = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\\0"
    u.send(struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1))
    u.recv(512)
    time.sleep(0.6)
    u.close()
    time.sleep(0.4)
    net.stop(); dns.stop()
    print("pid", __import__("os").getpid())
    for e in events:
        print(e)
""")


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"rf-sa-{tag}", f"rf-sb-{tag}"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        run("ip", "netns", "add", a)
        run("ip", "netns", "add", b)
        run("ip", "link", "add", f"rfa{tag}", "netns", a, "type", "veth", "peer", "name",
            f"rfb{tag}", "netns", b)
        run("ip", "-n", a, "addr", "add", "198.18.0.1/24", "dev", f"rfa{tag}")
        run("ip", "-n", b, "addr", "add", "198.18.0.2/24", "dev", f"rfb{tag}")
        for ns, dev in ((a, f"rfa{tag}"), (b, f"rfb{tag}")):
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


@pytest.mark.root
@pytest.mark.netns
def test_flows_and_dns_in_namespaces(two_namespaces: tuple[str, str]) -> None:
    a, b = two_namespaces
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    server = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        name = f"q{uuid.uuid4().hex[:8]}.example.test"
        out = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", CLIENT, name],
                             capture_output=True, text=True, timeout=30, env=env)
        assert out.returncode == 0, out.stderr
    finally:
        server.kill()
        server.wait()
    lines = out.stdout.split()
    client_pid = int(lines[lines.index("pid") + 1])
    events = [pb.Event.FromString(bytes.fromhex(h)) for h in lines[lines.index("pid") + 2:]]
    flows = [e.network for e in events if e.WhichOneof("body") == "network"
             and e.network.dst_endpoint.port == 8080]
    opened = [f for f in flows if f.activity_id == 1]
    closed = [f for f in flows if f.activity_id == 2]
    assert len(opened) == 1 and len(closed) == 1
    o = opened[0]
    assert (o.protocol, o.src_endpoint.ip, o.dst_endpoint.ip) == ("tcp", "198.18.0.1",
                                                                  "198.18.0.2")
    assert o.direction_id == 2 and o.state == "ESTABLISHED" and o.ip_version == 4
    assert o.pid == client_pid and o.exe == os.path.realpath(sys.executable).encode()
    assert o.community_id.startswith("1:") and closed[0].community_id == o.community_id
    assert closed[0].last_seen_ns >= o.first_seen_ns
    dns_events = [e.dns for e in events if e.WhichOneof("body") == "dns"]
    queries = [d for d in dns_events if d.activity_id == 1 and d.hostname == name]
    answers = [d for d in dns_events if d.activity_id == 2 and d.hostname == name]
    assert len(queries) == 1 and len(answers) == 1
    assert queries[0].transaction_id == 0x1234 and queries[0].qtype == "A"
    assert queries[0].dst_endpoint.ip == "198.18.0.2" and queries[0].dst_endpoint.port == 53
    assert answers[0].rcode == "NOERROR" and list(answers[0].answers) == ["198.18.0.53"]
    assert answers[0].community_id == queries[0].community_id
    assert queries[0].pid == client_pid
    # The connected UDP socket to port 53 is a flow too (outbound).
    assert any(e.network.dst_endpoint.port == 53 and e.network.protocol == "udp"
               for e in events if e.WhichOneof("body") == "network")


def test_flow_diff_on_canned_tables(tmp_path: Path) -> None:
    d = tmp_path
    head = TCP4.split(b"\n")[0] + b"\n"
    listen = TCP4.split(b"\n")[1] + b"\n"  # 127.0.0.1:8080 LISTEN
    inbound = (b"   1: 0100007F:1F90 0200007F:C350 01 00000000:00000000 00:00000000 00000000"
               b"     0        0 555 1 0000000000000000 20 4 30 10 -1\n")
    for name in ("tcp6", "udp", "udp6"):
        (d / name).write_bytes(head)
    (d / "tcp").write_bytes(head + listen)
    got: list[pb.Event] = []
    sensor = network.NetworkSensor(NetworkSensorConfig(), proc_net=str(d))
    sensor._emitter = SafeEmitter(got.append, "network")
    sensor.poll_once()
    assert got == []
    (d / "tcp").write_bytes(head + listen + inbound)
    sensor.poll_once()
    (opened,) = [e.network for e in got]
    assert opened.direction_id == 1 and opened.activity_id == 1
    assert (opened.src_endpoint.ip, opened.src_endpoint.port) == ("127.0.0.2", 50000)
    assert (opened.dst_endpoint.ip, opened.dst_endpoint.port) == ("127.0.0.1", 8080)
    (d / "tcp").write_bytes(head + listen + inbound.replace(b" 01 ", b" 06 "))  # TIME_WAIT
    sensor.poll_once()
    (d / "tcp").write_bytes(head + listen)
    sensor.poll_once()
    assert [e.network.activity_id for e in got] == [1, 2]
    assert got[1].network.state == "TIME_WAIT"
    assert got[1].network.community_id == opened.community_id


def _diag_msg(family: int, state: int, sport: int, dport: int, src: bytes, dst: bytes,
              uid: int, inode: int) -> bytes:
    body = (struct.pack("!BBBBHH16s16s", family, state, 0, 0, sport, dport, src, dst)
            + struct.pack("=I8sIIIII", 0, bytes(8), 0, 0, 0, uid, inode))
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_parse_inet_diag_canned_reply() -> None:
    v4 = _diag_msg(socket.AF_INET, 1, 40000, 443, bytes([10, 0, 0, 5]) + bytes(12),
                   bytes([93, 184, 216, 34]) + bytes(12), 1000, 4242)
    v6 = _diag_msg(socket.AF_INET6, 10, 22, 0, bytes(15) + b"\x01", bytes(16), 0, 7)
    out: list[network.SocketEntry] = []
    assert not network.parse_inet_diag(v4 + v6, out)
    assert network.parse_inet_diag(struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4), out)
    assert out == [network.SocketEntry("tcp", "10.0.0.5", 40000, "93.184.216.34", 443, 1, 1000,
                                       4242),
                   network.SocketEntry("tcp", "::1", 22, "::", 0, 10, 0, 7)]


def test_parse_inet_diag_error_raises() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -13) + bytes(16)
    with pytest.raises(OSError):
        network.parse_inet_diag(err, [])


def test_sock_diag_rows_equal_proc_net_rows() -> None:
    try:
        network.read_tcp_sock_diag()
    except OSError as e:
        pytest.skip(f"sock_diag unavailable: {e}")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    with srv, socket.create_connection(("127.0.0.1", port)):
        a, _ = srv.accept()
        with a:
            proc = sorted(e for e in network.read_socket_table() if e.protocol == "tcp")
            diag = sorted(network.read_tcp_sock_diag())
    # Other processes may open or close sockets between the two reads; ours must be in both.
    ours = {e for e in proc if port in (e.local_port, e.remote_port)}
    assert len(ours) == 3 and ours <= set(diag)
