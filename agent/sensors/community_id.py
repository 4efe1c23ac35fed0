"""Community ID v1 flow hashing (https://github.com/corelight/community-id-spec): a pure
function from a 5-tuple to "1:<base64(sha1)>". It does not look at packets.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import struct

logger = logging.getLogger(__name__)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMP6 = 58
PROTO_SCTP = 132

PROTO_NUMBERS = {"icmp": PROTO_ICMP, "tcp": PROTO_TCP, "udp": PROTO_UDP,
                 "icmp6": PROTO_ICMP6, "ipv6-icmp": PROTO_ICMP6, "sctp": PROTO_SCTP}

# ICMP message types that have a counterpart (request <-> reply): the counterpart takes the
# place of the destination port so both directions hash alike. Other types are one-way.
_ICMP4_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMP6_PAIRS = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136, 136: 135, 130: 131, 131: 130,
                139: 140, 140: 139, 144: 145, 145: 144}


def community_id(src_ip: str, dst_ip: str, src_port: int, dst_port: int, proto: int | str,
                 seed: int = 0) -> str:
    """Community ID v1 of a flow. For ICMP pass type as src_port and code as dst_port.

    Raises ValueError for unparsable addresses, mixed address families or bad ports.
    """
    proto_num = PROTO_NUMBERS[proto.lower()] if isinstance(proto, str) else proto
    saddr = ipaddress.ip_address(src_ip).packed
    daddr = ipaddress.ip_address(dst_ip).packed
    if len(saddr) != len(daddr):
        raise ValueError("community_id: source and destination address families differ")
    sport, dport = src_port, dst_port
    one_way = False
    if proto_num in (PROTO_ICMP, PROTO_ICMP6):
        pairs = _ICMP4_PAIRS if proto_num == PROTO_ICMP else _ICMP6_PAIRS
        if src_port in pairs:
            dport = pairs[src_port]
        else:
            one_way = True
    if not (one_way or saddr < daddr or (saddr == daddr and sport < dport)):
        saddr, daddr, sport, dport = daddr, saddr, dport, sport
    data = struct.pack("!H", seed) + saddr + daddr + struct.pack("!BB", proto_num, 0)
    if proto_num in (PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMP6, PROTO_SCTP):
        data += struct.pack("!HH", sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")
