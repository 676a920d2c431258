"""Who may talk to the server: the Host and Origin checks that stop cross-site and DNS-rebinding access.

A web page the user visits can send requests to a server on 127.0.0.1 (a form-like
`text/plain` POST needs no CORS preflight), and with DNS rebinding (the page's own
name resolving to 127.0.0.1) it can also read the answers. Browsers always send the
page's name as `Host` and its origin as `Origin`, so the server answers only requests
whose `Host` names this machine's loopback or bound address (or `--allowed-hosts`),
whose `Origin`, when present, is a loopback page or one of `--allowed-origins`, and
whose body is declared JSON (which a page cannot send cross-site without a preflight).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import urlsplit

from ..errors import OptionError

_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(name: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped), `localhost` and `*.localhost` (bare or in [])."""
    name = name.strip("[]").lower().rstrip(".")
    address = _ip(name)
    if address is None:
        return name == "localhost" or name.endswith(".localhost")
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _split_values(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_allowed_hosts(values: Iterable[str]) -> frozenset[str]:
    """`--allowed-hosts` (repeatable, comma-separated): host names or IP addresses without a port,
    or `*` for any Host. Raises `OptionError` naming a value that is not one."""
    hosts = set()
    for value in _split_values(values):
        name = value.lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if name != "*" and _ip(name) is None and not _NAME.match(name):
            raise OptionError(f"allowed_hosts: {value!r} is not a host name or IP address "
                              "(give it without a port or scheme, or '*' for any)")
        hosts.add(name)
    return frozenset(hosts)


def parse_allowed_origins(values: Iterable[str]) -> frozenset[str]:
    """`--allowed-origins` (repeatable, comma-separated): web origins `scheme://host[:port]`, or `*`
    for any. Raises `OptionError` naming a value that is not one."""
    origins = set()
    for value in _split_values(values):
        if value == "*":
            origins.add(value)
            continue
        origin = value.lower().removesuffix("/")
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment \
                or "@" in parts.netloc:
            raise OptionError(f"allowed_origins: {value!r} is not a web origin (scheme://host[:port], "
                              "as a browser sends it, e.g. http://localhost:3000; or '*' for any)")
        origins.add(origin)
    return frozenset(origins)


def host_name(header: str) -> Optional[str]:
    """The name in a `Host` header (`name`, `name:port`, `[v6]`, `[v6]:port`), lowercase; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":\d*", rest)) or _ip(name) is None:
            return None
        return name
    name, _, port = header.partition(":")
    if not re.fullmatch(r"\d*", port):
        return None
    name = name.rstrip(".")
    return name if name and (_NAME.match(name) or _ip(name) is not None) else None


@dataclass(frozen=True)
class AccessPolicy:
    """The Host and Origin rules of one server; see the module docstring."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()

    def host_refusal(self, header: Optional[str]) -> Optional[tuple[int, str]]:
        """(status, message) when a request's `Host` header is not allowed, else None."""
        if header is None:
            return 400, "the request has no Host header"
        name = host_name(header)
        if name is None:
            return 400, f"the Host header {header!r} is not a host name"
        if "*" in self.allowed_hosts or name in self.allowed_hosts or is_loopback(name):
            return None
        bound = self.bound_host.strip("[]").lower().rstrip(".")
        # Bound to every address: any IP literal names this machine as the user typed it; only a
        # name (what DNS rebinding needs) must be listed.
        if name == bound or (bound in WILDCARD_ADDRESSES and _ip(name) is not None):
            return None
        return 403, (f"Host {header!r} is not allowed: this server answers requests for localhost and its own "
                     "address (to serve other names, start it with --allowed-hosts)")

    def origin_allowed(self, origin: Optional[str]) -> bool:
        """True when there is no `Origin` (not a browser's cross-origin request) or it is allowed."""
        if origin is None:
            return True
        origin = origin.strip().lower()
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            return False
        # A page served from this machine's loopback is a local program, which could call the server anyway.
        return parts.scheme in ("http", "https") and bool(parts.hostname) and is_loopback(parts.hostname)

    def origin_refusal(self, origin: Optional[str]) -> Optional[tuple[int, str]]:
        if self.origin_allowed(origin):
            return None
        return 403, (f"Origin {origin!r} is not allowed: web pages from other sites may not use this server "
                     "(to allow one, start it with --allowed-origins)")


def is_json_content_type(header: Optional[str]) -> bool:
    """True for `application/json`, with any parameters (`; charset=utf-8`), in any case."""
    return header is not None and header.split(";", 1)[0].strip().lower() == "application/json"
