"""Where an upstream may send the mirror: the address policy for redirect targets.

Registries redirect blob downloads to storage (S3, a CDN). A hostile or compromised
upstream could instead point the mirror at the metadata service (169.254.169.254), at
loopback admin ports or into the private network around it (SSRF). A redirect target is
allowed when every address it resolves to is

- one of the upstream's own addresses (the same machine), or
- public (``ipaddress``'s ``is_global``), or
- private (RFC 1918, ULA, CGNAT, ...) while the upstream itself has a private address
  (a private registry with its storage next to it).

Loopback and link-local targets are refused unless they are the upstream's own address;
unspecified, multicast and reserved addresses always. The connection then goes to the
checked address (``pin``), with the original name for ``Host`` and TLS, so a second DNS
answer cannot swap the target after the check (DNS rebinding).
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
    FORBIDDEN = "forbidden"  # unspecified, multicast, reserved


def classify(address: IPAddress) -> Kind:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return Kind.FORBIDDEN
    if address.is_loopback:
        return Kind.LOOPBACK
    if address.is_link_local:
        return Kind.LINK_LOCAL
    if address.is_global:
        return Kind.PUBLIC
    return Kind.PRIVATE


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
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
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
