"""Where an upstream may send the mirror: the address policy for redirect targets.

Registries redirect blob downloads to storage (S3, a CDN). A hostile or compromised
upstream could instead point the mirror at the metadata service (169.254.169.254), at
loopback admin ports or into the private network around it (SSRF). A redirect target is
allowed when every address it resolves to is

- one of the upstream's own addresses (the same machine), or
- public, or
- private (RFC 1918, ULA, CGNAT, ...) while the upstream itself has a private address
  (a private registry with its storage next to it).

Loopback and link-local targets are refused unless they are the upstream's own address;
unspecified, multicast, reserved, documentation and other special-purpose addresses always.
The connection then goes to the checked address (``pin``), with the original name for
``Host`` and TLS, so a second DNS answer cannot swap the target after the check (DNS
rebinding).

The kinds come from our own tables of the IANA special-purpose registries
(https://www.iana.org/assignments/iana-ipv4-special-registry,
https://www.iana.org/assignments/iana-ipv6-special-registry), not from ``ipaddress``'s
``is_global``, whose answers differ between Python versions (3.11 calls 6to4 addresses
that embed 169.254.169.254 global). IPv6 forms that carry an IPv4 address are judged by
that address: IPv4-mapped (``::ffff:0:0/96``), NAT64 with the well-known prefix
(``64:ff9b::/96``, RFC 6052) and 6to4 (``2002::/16``, RFC 3056) — the last two are public
only when the embedded address is (RFC 6052 section 3.1 forbids non-global addresses under
the well-known prefix), so an IPv6-only cluster behind DNS64 still reaches public storage.
Teredo (``2001::/32``), IPv4-compatible (``::/96``) and IPv4-translated addresses are
never allowed: no registry storage lives there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from enum import Enum

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    FORBIDDEN = "forbidden"  # unspecified, multicast, reserved, documentation, tunnels


def _table(*rows: tuple[str, Kind]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Kind], ...]:
    return tuple((ipaddress.ip_network(network), kind) for network, kind in rows)


# First match wins; anything not listed is public (IPv4) or, for IPv6, public only inside
# 2000::/3 (global unicast), forbidden elsewhere (unallocated).
_IPV4 = _table(
    ("0.0.0.0/8", Kind.FORBIDDEN),  # "this network"
    ("10.0.0.0/8", Kind.PRIVATE),
    ("100.64.0.0/10", Kind.PRIVATE),  # carrier-grade NAT (RFC 6598)
    ("127.0.0.0/8", Kind.LOOPBACK),
    ("169.254.0.0/16", Kind.LINK_LOCAL),  # cloud metadata lives here
    ("172.16.0.0/12", Kind.PRIVATE),
    ("192.0.0.0/24", Kind.FORBIDDEN),  # IETF protocol assignments (DS-Lite, PCP/TURN anycast, NAT64 discovery)
    ("192.0.2.0/24", Kind.FORBIDDEN),  # documentation
    ("192.88.99.0/24", Kind.FORBIDDEN),  # 6to4 relay anycast (deprecated, RFC 7526)
    ("192.168.0.0/16", Kind.PRIVATE),
    ("198.18.0.0/15", Kind.PRIVATE),  # benchmarking
    ("198.51.100.0/24", Kind.FORBIDDEN),  # documentation
    ("203.0.113.0/24", Kind.FORBIDDEN),  # documentation
    ("224.0.0.0/4", Kind.FORBIDDEN),  # multicast
    ("240.0.0.0/4", Kind.FORBIDDEN),  # reserved, and the broadcast address
)
_IPV6 = _table(
    ("::/128", Kind.FORBIDDEN),
    ("::1/128", Kind.LOOPBACK),
    ("::/96", Kind.FORBIDDEN),  # IPv4-compatible (deprecated, RFC 4291 section 2.5.5.1)
    ("::ffff:0:0:0/96", Kind.FORBIDDEN),  # IPv4-translated (RFC 2765)
    ("64:ff9b:1::/48", Kind.PRIVATE),  # local-use NAT64 (RFC 8215): the local network's translator
    ("100::/64", Kind.FORBIDDEN),  # discard-only
    ("2001::/32", Kind.FORBIDDEN),  # Teredo: reaches an IPv4 host through a relay
    ("2001::/23", Kind.FORBIDDEN),  # other IETF protocol assignments (ORCHID, benchmarking, ...)
    ("2001:db8::/32", Kind.FORBIDDEN),  # documentation
    ("3fff::/20", Kind.FORBIDDEN),  # documentation (RFC 9637)
    ("5f00::/16", Kind.FORBIDDEN),  # SRv6 SIDs (RFC 9602)
    ("fc00::/7", Kind.PRIVATE),  # unique local (ULA)
    ("fe80::/10", Kind.LINK_LOCAL),
    ("fec0::/10", Kind.PRIVATE),  # site-local (deprecated, RFC 3879)
    ("ff00::/8", Kind.FORBIDDEN),  # multicast
)
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, NAT64 (well-known prefix) or 6to4 address carries."""
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def classify(address: IPAddress) -> Kind:
    if isinstance(address, ipaddress.IPv4Address):
        return _lookup(address, _IPV4, Kind.PUBLIC)
    inner = embedded_ipv4(address)
    if inner is not None:
        kind = classify(inner)
        if address in _MAPPED:
            return kind  # the same socket as the IPv4 address itself
        return kind if kind is Kind.PUBLIC else Kind.FORBIDDEN
    return _lookup(address, _IPV6, Kind.PUBLIC if address in _GLOBAL_UNICAST else Kind.FORBIDDEN)


def _lookup(
    address: IPAddress, table: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Kind], ...], default: Kind
) -> Kind:
    for network, kind in table:
        if address in network:
            return kind
    return default


def allowed(target: IPAddress, upstream: frozenset[IPAddress]) -> bool:
    """May the mirror connect to ``target`` on behalf of an upstream at ``upstream``?"""
    if target in upstream:
        return True
    kind = classify(target)
    if kind is Kind.PUBLIC:
        return True
    return kind is Kind.PRIVATE and any(classify(a) is Kind.PRIVATE for a in upstream)


def literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal is itself); ``OSError`` or
    ``TimeoutError`` when it does not resolve in time."""
    address = literal(host)
    if address is not None:
        return [address]
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise OSError(f"{host} has no addresses")
    return found


def pin(url: URL, address: IPAddress) -> URL:
    """``url`` with its host replaced by the checked address (port, path, query kept)."""
    return url.with_host(str(address))
