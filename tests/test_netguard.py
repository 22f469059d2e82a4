"""The redirect address policy (``proxy.registry.upstream.netguard``), issue 13 finding 9:
special-purpose addresses — above all IPv6 forms that carry a private or link-local IPv4
address — are never taken for public ones. Table-driven, plus hypothesis properties over
the whole address space. (The redirects themselves, against bait listeners, are in
``test_ssrf.py``.)"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.registry.upstream import netguard
from proxy.registry.upstream.netguard import Kind, classify

PUBLIC_UPSTREAM = frozenset({ipaddress.ip_address("93.184.216.34")})
PRIVATE_UPSTREAM = frozenset({ipaddress.ip_address("10.0.0.5")})


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        # The addresses the attack of issue 13 got through as "public".
        ("2002:a9fe:a9fe::1", Kind.FORBIDDEN),  # 6to4 around 169.254.169.254 (metadata)
        ("2002:0a00:0001::1", Kind.FORBIDDEN),  # 6to4 around 10.0.0.1
        ("2002:7f00:0001::1", Kind.FORBIDDEN),  # 6to4 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", Kind.FORBIDDEN),  # NAT64 around the metadata address
        ("64:ff9b::10.0.0.1", Kind.FORBIDDEN),
        ("64:ff9b::127.0.0.1", Kind.FORBIDDEN),
        ("fd00::1", Kind.PRIVATE),  # ULA
        ("fc00::1", Kind.PRIVATE),
        ("100.64.0.1", Kind.PRIVATE),  # CGNAT
        ("100.127.255.254", Kind.PRIVATE),
        ("192.0.0.9", Kind.FORBIDDEN),  # PCP anycast: "globally reachable" to ipaddress, not storage
        ("192.0.0.1", Kind.FORBIDDEN),
        ("192.0.0.170", Kind.FORBIDDEN),
        # Other spellings of an IPv4 address inside IPv6.
        ("::ffff:127.0.0.1", Kind.LOOPBACK),  # IPv4-mapped: the same socket
        ("::ffff:169.254.169.254", Kind.LINK_LOCAL),
        ("::ffff:10.0.0.1", Kind.PRIVATE),
        ("::ffff:8.8.8.8", Kind.PUBLIC),
        ("::127.0.0.1", Kind.FORBIDDEN),  # IPv4-compatible (deprecated)
        ("::169.254.169.254", Kind.FORBIDDEN),
        ("::ffff:0:a9fe:a9fe", Kind.FORBIDDEN),  # IPv4-translated
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Kind.FORBIDDEN),  # Teredo
        ("2001:0:a9fe:a9fe::1", Kind.FORBIDDEN),
        # Public addresses stay public, also behind DNS64 and 6to4.
        ("93.184.216.34", Kind.PUBLIC),
        ("2606:4700::1", Kind.PUBLIC),
        ("64:ff9b::8.8.8.8", Kind.PUBLIC),  # an IPv6-only cluster reaching public storage
        ("2002:0808:0808::1", Kind.PUBLIC),
        # The rest of the special-purpose registries.
        ("0.0.0.0", Kind.FORBIDDEN),
        ("0.1.2.3", Kind.FORBIDDEN),
        ("127.0.0.2", Kind.LOOPBACK),
        ("169.254.169.254", Kind.LINK_LOCAL),
        ("10.1.2.3", Kind.PRIVATE),
        ("172.31.0.1", Kind.PRIVATE),
        ("192.168.1.1", Kind.PRIVATE),
        ("198.18.0.1", Kind.PRIVATE),
        ("192.0.2.1", Kind.FORBIDDEN),
        ("198.51.100.1", Kind.FORBIDDEN),
        ("203.0.113.1", Kind.FORBIDDEN),
        ("192.88.99.1", Kind.FORBIDDEN),
        ("224.0.0.1", Kind.FORBIDDEN),
        ("240.0.0.1", Kind.FORBIDDEN),
        ("255.255.255.255", Kind.FORBIDDEN),
        ("::", Kind.FORBIDDEN),
        ("::1", Kind.LOOPBACK),
        ("fe80::1", Kind.LINK_LOCAL),
        ("fec0::1", Kind.PRIVATE),  # site-local
        ("ff02::1", Kind.FORBIDDEN),
        ("2001:db8::1", Kind.FORBIDDEN),
        ("3fff::1", Kind.FORBIDDEN),
        ("2001:10::1", Kind.FORBIDDEN),  # ORCHID
        ("100::1", Kind.FORBIDDEN),
        ("5f00::1", Kind.FORBIDDEN),
        ("64:ff9b:1::a00:1", Kind.PRIVATE),  # local-use NAT64: the local translator
        ("4000::1", Kind.FORBIDDEN),  # outside global unicast: unallocated
    ],
)
def test_address_kinds(address: str, kind: Kind) -> None:
    assert classify(ipaddress.ip_address(address)) is kind


@pytest.mark.parametrize(
    ("target", "upstream", "allowed"),
    [
        ("2002:a9fe:a9fe::1", PRIVATE_UPSTREAM, False),  # not even for a private upstream
        ("64:ff9b::10.0.0.6", PRIVATE_UPSTREAM, False),
        ("fd00::1", PUBLIC_UPSTREAM, False),
        ("fd00::1", PRIVATE_UPSTREAM, True),  # a private registry with its storage next to it
        ("100.64.0.1", PUBLIC_UPSTREAM, False),
        ("100.64.0.1", PRIVATE_UPSTREAM, True),
        ("192.0.0.9", PRIVATE_UPSTREAM, False),
        ("::ffff:10.0.0.6", PRIVATE_UPSTREAM, True),
        ("::ffff:10.0.0.6", PUBLIC_UPSTREAM, False),
        ("64:ff9b::8.8.8.8", PUBLIC_UPSTREAM, True),
        ("2001:0:a9fe:a9fe::1", PUBLIC_UPSTREAM, False),
    ],
)
def test_redirect_policy(target: str, upstream: frozenset[netguard.IPAddress], allowed: bool) -> None:
    assert netguard.allowed(ipaddress.ip_address(target), upstream) is allowed


# --- properties -----------------------------------------------------------------------------
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
NOT_PUBLIC_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]  # fmt: skip
NOT_PUBLIC_V6 = ["::/8", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"]


def in_network(cidr: str) -> st.SearchStrategy[netguard.IPAddress]:
    network = ipaddress.ip_network(cidr)
    start, kind = int(network.network_address), type(network.network_address)
    return st.integers(start, start + network.num_addresses - 1).map(kind)


def nat64(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))


def six_to_four(address: ipaddress.IPv4Address, suffix: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | (suffix & ((1 << 80) - 1)))


def mapped(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address((0xFFFF << 32) | int(address))


PROPERTY = settings(max_examples=500, deadline=None)


@PROPERTY
@given(st.one_of(*(in_network(c) for c in NOT_PUBLIC_V4 + NOT_PUBLIC_V6)))
def test_special_purpose_ranges_are_never_public(address: netguard.IPAddress) -> None:
    assert classify(address) is not Kind.PUBLIC
    assert not netguard.allowed(address, PUBLIC_UPSTREAM)


@PROPERTY
@given(ipv4, st.integers(0, 2**80 - 1))
def test_ipv6_wrappers_are_judged_by_the_ipv4_address_they_carry(address: ipaddress.IPv4Address, suffix: int) -> None:
    inner = classify(address)
    assert classify(mapped(address)) is inner, "IPv4-mapped is the same socket"
    for wrapped in (nat64(address), six_to_four(address, suffix)):
        assert classify(wrapped) is (Kind.PUBLIC if inner is Kind.PUBLIC else Kind.FORBIDDEN), wrapped
        assert netguard.embedded_ipv4(wrapped) == address


@PROPERTY
@given(ipv6)
def test_every_ipv6_address_classifies_and_only_global_unicast_is_public(address: ipaddress.IPv6Address) -> None:
    kind = classify(address)
    if kind is Kind.PUBLIC:
        inner = netguard.embedded_ipv4(address)
        assert address in ipaddress.ip_network("2000::/3") or (inner is not None and classify(inner) is Kind.PUBLIC)
        assert address not in ipaddress.ip_network("2001::/32"), "Teredo"


@PROPERTY
@given(st.one_of(ipv4, ipv6), st.one_of(ipv4, ipv6))
def test_public_upstream_reaches_only_public_addresses_or_itself(
    target: netguard.IPAddress, upstream: netguard.IPAddress
) -> None:
    own = frozenset({upstream})
    if classify(upstream) is Kind.PUBLIC:
        assert netguard.allowed(target, own) is (target == upstream or classify(target) is Kind.PUBLIC)
    if classify(target) in (Kind.LOOPBACK, Kind.LINK_LOCAL, Kind.FORBIDDEN):
        assert netguard.allowed(target, own) is (target == upstream)
