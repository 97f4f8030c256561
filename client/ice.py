"""Loopback calls: aioice never offers 127.0.0.1 as a host candidate, so a client could not reach a server
on the same machine that offers only loopback (a dev box, a test, a car's head unit serving itself).
When the server's URL is a loopback address, the client offers loopback candidates too. Process-wide, as
aioice's function is."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import aioice.ice

_original = aioice.ice.get_host_addresses


def _with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = list(_original(use_ipv4=use_ipv4, use_ipv6=use_ipv6))
    if use_ipv4 and "127.0.0.1" not in addresses:
        addresses.append("127.0.0.1")
    return addresses


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def offer_loopback_for(url: str) -> None:
    if is_loopback_url(url):
        aioice.ice.get_host_addresses = _with_loopback
