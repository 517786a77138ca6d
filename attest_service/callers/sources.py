"""Where a request comes from, as the rate limits count it.

Behind a load balancer or an ingress every request arrives from the proxy's address; the client's is in
``X-Forwarded-For``, which anyone can also write. The header is believed only when the peer is one of the
operator's trusted proxies (``ATTEST_TRUSTED_PROXIES``), and then only as far as it was written by trusted
proxies: each proxy appends the address it received the request from, so the list is read from the right
and the first address that is not a trusted proxy is the client. Entries left of it were written by the
client itself and are ignored.

IPv6 sources are counted by their /64 network: one host is given a whole /64, and a caller rotating through
its addresses would otherwise get a fresh budget (and fresh keys in the store) with each one.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

from attest_service.settings import IPNetwork

#: Prefix length by which IPv6 sources are grouped (RFC 4291 2.5.1: interface identifiers are 64 bits).
IPV6_SOURCE_PREFIX: Final = 64
#: Most X-Forwarded-For entries read; a longer chain of trusted proxies is a misconfiguration or an attack.
MAX_FORWARDED_HOPS: Final = 16
#: The source of a request whose address cannot be read (a Unix socket peer without a trusted proxy).
UNKNOWN_SOURCE: Final = "unknown"
#: Longest X-Forwarded-For text (all its headers) whose source is remembered; longer ones are parsed each time.
MAX_REMEMBERED_FORWARDED_CHARS: Final = 512
#: Sources remembered by :func:`remembered_source` (least recently used first to go).
MAX_REMEMBERED_SOURCES: Final = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An address as a peer or a forwarded entry writes it (``a.b.c.d``, ``a.b.c.d:port``, ``[v6]:port``)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(address.version == network.version and address in network for network in proxies)


def client_address(peer: str | None, forwarded_for: Iterable[str], proxies: Sequence[IPNetwork]) -> IPAddress | None:
    """The client's address: the peer, or when the peer is a trusted proxy, the right-most untrusted hop.

    ``forwarded_for`` holds the values of every ``X-Forwarded-For`` header, in order. An entry that is
    not an address stops the walk at the proxy that passed it on.
    """
    address = parse_address(peer) if peer else None
    if address is None or not _trusted(address, proxies):
        return address
    hops = [entry for value in forwarded_for for entry in value.split(",")]
    for entry in reversed(hops[-MAX_FORWARDED_HOPS:]):
        hop = parse_address(entry)
        if hop is None:
            return address
        address = hop
        if not _trusted(address, proxies):
            return address
    # Every hop is a trusted proxy (or there is none): the left-most one is as close to the client as known.
    return address


def source_key(address: IPAddress | None) -> str:
    """The rate-limit key of an address: the IPv4 address, or the IPv6 /64 network it belongs to."""
    if address is None:
        return UNKNOWN_SOURCE
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


def request_source(peer: str | None, forwarded_for: str | None, proxies: tuple[IPNetwork, ...]) -> str:
    """The source of a request from ``peer`` with this ``X-Forwarded-For`` value (None: no header)."""
    if not proxies:
        # X-Forwarded-For is not read without trusted proxies: the peer alone is the source.
        return remembered_source(peer, (), ())
    forwarded: tuple[str, ...] = () if forwarded_for is None else (forwarded_for,)
    if sum(len(value) for value in forwarded) > MAX_REMEMBERED_FORWARDED_CHARS:
        # The header is the caller's to write, up to gunicorn's limits: never a cache key of that size.
        return source_key(client_address(peer, forwarded, proxies))
    return remembered_source(peer, forwarded, proxies)


@functools.lru_cache(maxsize=MAX_REMEMBERED_SOURCES)
def remembered_source(peer: str | None, forwarded_for: tuple[str, ...], proxies: tuple[IPNetwork, ...]) -> str:
    """:func:`source_key` of :func:`client_address`, remembered: a client sends the same peer and headers each time.

    Parsing addresses with :mod:`ipaddress` is a measurable share of a request (docs/DEPLOYMENT.md). The
    cache is bounded (keys of at most :data:`MAX_REMEMBERED_FORWARDED_CHARS`), so a flood of distinct
    sources costs only the parse it always cost, and a few MiB at most.
    """
    return source_key(client_address(peer, forwarded_for, proxies))
