"""Where Moments may connect out to (URI ingest, webhooks): never ``file://``, and no private,
loopback, link-local, multicast or otherwise non-public address unless ``Settings.allow_networks``
lists it (tests list loopback). Names are resolved here and every resolved address is checked, so
callers connect to one of the returned addresses (not the name again: a second lookup could be
answered differently).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from moments.core import errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(spec: str) -> tuple[Network, ...]:
    """``"127.0.0.0/8, ::1, 10.1.2.3"`` -> networks (a bare address is a /32 or /128)."""
    out = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"allow_networks entry {item!r} is not an address or network: {exc}") from None
    return tuple(out)


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts and the addresses it may be reached at."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def check_url(url: str, *, schemes: Sequence[str], allow: Sequence[Network], field: str,
              resolve: Callable = socket.getaddrinfo) -> Target:
    """Raise InvalidArgument (naming ``field``) unless ``url`` may be connected to; else its target."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise errors.InvalidArgument(f"malformed URL: {exc}", field=field) from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise errors.InvalidArgument(f"URL scheme {scheme or '(none)'!r} is not allowed; use one of "
                                     f"{', '.join(schemes)}", field=field)
    host = parts.hostname
    if not host:
        raise errors.InvalidArgument("URL has no host", field=field)
    if parts.username or parts.password:
        raise errors.InvalidArgument("URL must not carry credentials", field=field)
    port = port or {"https": 443, "http": 80}.get(scheme, 0)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise errors.InvalidArgument(f"host {host!r} does not resolve: {exc}", field=field) from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not is_public(address) and not any(address in net for net in allow):
            raise errors.InvalidArgument(
                f"host {host!r} resolves to {address}, a private, loopback or link-local address "
                "(allow-list it in Settings.allow_networks to permit it)", field=field)
        addresses.append(str(address))
    if not addresses:
        raise errors.InvalidArgument(f"host {host!r} has no address", field=field)
    return Target(scheme, host, port, tuple(dict.fromkeys(addresses)))
