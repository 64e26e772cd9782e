"""The client's address as the gateway should believe it.

Without trusted proxies it is the peer address. With ``gateway.trusted_proxies``, when the peer
is one of them, ``X-Forwarded-For`` is walked from the right and the first address that is not a
trusted proxy is the client (the rule nginx's ``real_ip_recursive`` and Envoy's
``xff_num_trusted_hops`` implement): entries left of it could be forged by the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        ip = parse_ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def client_ip(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        if not self.networks or not self.trusts(peer):
            return peer
        hops: list[str] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                hops.extend(p.strip() for p in value.decode("latin-1").split(","))
        for hop in reversed(hops):
            if not hop:
                continue
            if parse_ip(hop) is None:
                return peer  # garbage in the chain: believe nothing left of it
            if not self.trusts(hop):
                return hop
        return hops[0] if hops and parse_ip(hops[0]) is not None else peer


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
