"""Where a webhook may be sent: SSRF protection, at create and again at every delivery (DNS can
change in between, so the delivery connects to the addresses checked here, not to a second lookup).

A URL is refused unless it is http(s) without credentials, and every address its host resolves to
is a global unicast address, or is allowed by the operator (settings.webhooks.allow_private, or
one of allowed_networks). One refused address refuses the URL: a name resolving to a public and a
private address must not reach the private one on some attempt.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from app.core.config import WebhookSettings
from app.domains.webhooks.errors import WebhookUrlRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Target:
    """A URL checked for sending: its parts, and the addresses (all allowed) to connect to."""

    url: SplitResult
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def parse(url: str) -> tuple[SplitResult, str, int]:
    """(the parts, the host, the port) of an http(s) URL. Raises WebhookUrlRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlRefused(f"url {url!r} is not a valid URL ({exc}).", param="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlRefused(f"url {url!r} must be an http:// or https:// URL with a host.", param="url")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRefused("url must not carry credentials (user:password@); verify deliveries by their "
                                "signature instead.", param="url")
    if parts.fragment:
        raise WebhookUrlRefused("url must not have a #fragment: it is never sent.", param="url")
    return parts, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def blocked(address: IPAddress) -> bool:
    """Whether the address is one endpoints may not reach without the operator's allowance: private,
    loopback, link-local, shared, reserved, unspecified or multicast (an IPv4-mapped IPv6 address is
    judged as its IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def allowed(address: IPAddress, settings: WebhookSettings) -> bool:
    return (not blocked(address) or settings.allow_private
            or any(address in network for network in settings.allowed_networks))


def resolve(url: str, settings: WebhookSettings) -> Target:
    """Check the URL and resolve its host now. Raises WebhookUrlRefused when it is malformed, does not
    resolve, or resolves to an address endpoints may not reach."""
    parts, host, port = parse(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlRefused(f"url's host {host!r} does not resolve ({exc}).", param="url") from None
    addresses = tuple(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    refused = [a for a in addresses if not allowed(a, settings)]
    if not addresses or refused:
        raise WebhookUrlRefused(
            f"url's host {host!r} resolves to {', '.join(map(str, refused or addresses))}, a private, loopback, "
            "link-local or reserved address, which webhooks may not reach. Use a public address, or ask the "
            "operator to allow it (TUNEFORGE_WEBHOOKS__ALLOW_PRIVATE or TUNEFORGE_WEBHOOKS__ALLOWED_NETWORKS).",
            param="url", code="url_not_allowed")
    return Target(url=parts, host=host, port=port, addresses=addresses)
