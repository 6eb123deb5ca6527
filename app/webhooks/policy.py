"""Which URLs a webhook endpoint may have, and which address a delivery may connect to (SSRF rules).

A tenant chooses the URL, and the service, not the tenant, makes the request: without rules, a webhook is a
way to make the service reach its own network (the cloud metadata service at 169.254.169.254, a database on
localhost, an admin page on 10.0.0.0/8). So:

* ``https`` only (``http`` too with ``DISTILLERY_WEBHOOK_ALLOW_HTTP``); no credentials (``user:pass@``), no
  whitespace, control characters or backslashes (parsers disagree on those), at most 2048 characters.
* The host is resolved (``getaddrinfo``, which opens no connection) when the endpoint is registered **and**
  before every delivery; every address it resolves to must be globally routable — not loopback,
  link-local, private, shared (CGNAT), multicast, unspecified, reserved or documentation space, also when
  wrapped in IPv6 (IPv4-mapped, 6to4, NAT64). A host named in ``DISTILLERY_WEBHOOK_ALLOWED_HOSTS`` skips the
  address rules (a receiver on the operator's own network, the tests' receiver on 127.0.0.1).
* A delivery connects to the address that passed the check (:attr:`Destination.address`), with the
  original host in ``Host`` and in TLS SNI / certificate verification, so a DNS answer that changes between
  the check and the connection (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from app.errors import Unprocessable
from app.settings import Settings

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``host, port -> addresses``; the default asks the system resolver, bounded in time.
Resolver = Callable[[str, int, float], list[str]]

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the IPv4 address is the last 32 bits
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): a private translator
# A few lookups at a time; a resolver that hangs costs a caller the timeout, never a thread of its own forever.
_RESOLVERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distillery-webhook-dns")


class UrlRefused(Unprocessable):
    """A webhook URL that is malformed or that the SSRF rules refuse (422 ``invalid_webhook_url``)."""

    code, title = "invalid_webhook_url", "Invalid webhook URL"

    def __init__(self, detail: str):
        super().__init__(detail, errors=[{"loc": ["body", "url"], "msg": detail, "type": "invalid_webhook_url"}])


@dataclass(frozen=True)
class Destination:
    """Where one delivery goes: ``host`` (as named by the URL, IDNA-encoded), ``port``, ``target`` (path and
    query) and ``address``, the IP that passed the check and that the connection must use."""

    scheme: str
    host: str
    port: int
    target: str
    address: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host (what the HTTP client connects to)."""
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.target}"

    @property
    def host_is_name(self) -> bool:
        return _ip(self.host) is None


def check(url: str, settings: Settings, resolve: Resolver | None = None) -> Destination:
    """The destination of ``url`` if the rules allow it (see the module docstring); raises
    :class:`UrlRefused` saying why not. Resolves the host (no connection is made)."""
    parts = _parse(url, settings)
    host = _host(parts)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    timeout = settings.webhook_timeout_seconds
    try:
        # An IP literal is its own answer; a name is looked up (the resolver may say anything).
        addresses = [host] if _ip(host) is not None else (resolve or resolve_host)(host, port, timeout)
    except OSError as exc:
        raise UrlRefused(f"the host {host!r} does not resolve ({exc.__class__.__name__}: {exc})") from None
    if not addresses:
        raise UrlRefused(f"the host {host!r} does not resolve to any address")
    if not allowed_host(host, settings):
        for address in addresses:
            if (why := refusal(address)) is not None:
                named = "is" if address == host else f"resolves to {address}, which is"
                raise UrlRefused(f"the host {host!r} {named} {why}; webhooks reach public addresses only "
                                 "(an operator may allow a host with DISTILLERY_WEBHOOK_ALLOWED_HOSTS)")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination(parts.scheme, host, port, target, addresses[0])


def validate(url: str, settings: Settings) -> None:
    """The syntax rules alone (no resolution): raises :class:`UrlRefused`."""
    _host(_parse(url, settings))


def allowed_host(host: str, settings: Settings) -> bool:
    """Whether ``host`` (as :func:`check` normalises it) is in ``DISTILLERY_WEBHOOK_ALLOWED_HOSTS``; IP literals
    compare as addresses (``::1`` matches ``0:0:0:0:0:0:0:1``)."""
    return host in {str(ip) if (ip := _ip(h)) is not None else h for h in settings.webhook_allowed_hosts}


def _parse(url: str, settings: Settings) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are accepted")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise UrlRefused("the URL contains whitespace, a control character or a backslash")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise UrlRefused(f"the URL is malformed: {exc}") from None
    schemes = ("https", "http") if settings.webhook_allow_http else ("https",)
    if parts.scheme not in schemes:
        allowed = "https:// (or http:// where DISTILLERY_WEBHOOK_ALLOW_HTTP is set)" if len(schemes) == 1 else \
            "https:// or http://"
        raise UrlRefused(f"the URL must start with {allowed}; got {parts.scheme + ':' if parts.scheme else 'none'}")
    if "@" in parts.netloc:
        raise UrlRefused("the URL must not carry credentials (user:password@); authenticate the request with "
                         "its signature instead")
    if parts.port == 0:
        raise UrlRefused("the URL's port must be between 1 and 65535")
    return parts


def _host(parts: SplitResult) -> str:
    """The host as it is resolved and compared with the allow-list: lowercase, IDNA-encoded, no final dot."""
    raw = (parts.hostname or "").rstrip(".")
    if not raw:
        raise UrlRefused("the URL has no host")
    if _ip(raw) is not None:
        return str(_ip(raw))
    try:
        host = raw.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UrlRefused(f"the host {raw!r} is not a valid domain name") from None
    if any(not (c.isalnum() or c in "-._") for c in host):
        raise UrlRefused(f"the host {raw!r} is not a valid domain name")
    return host


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def refusal(address: str) -> str | None:
    """Why a connection to ``address`` is not allowed (e.g. "a loopback address"), or None when it is public.
    IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address."""
    ip = _ip(address.split("%", 1)[0])  # a zone index (fe80::1%eth0) names an interface, not an address
    if ip is None:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return "a local-use NAT64 address (RFC 8215)"
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
                                                      if ip in _NAT64 else None)
        if embedded is not None:
            why = refusal(str(embedded))
            return None if why is None else f"{why} (as {embedded}, inside an IPv6 address)"
    checks = (("is_unspecified", "an unspecified address"), ("is_loopback", "a loopback address"),
              ("is_link_local", "a link-local address (this includes cloud metadata services)"),
              ("is_multicast", "a multicast address"), ("is_reserved", "a reserved address"))
    for attr, why in checks:
        if getattr(ip, attr):
            return why
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def resolve_host(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to for TCP (``getaddrinfo``: a lookup, no connection), in the
    resolver's order, without repeats; raises OSError (``TimeoutError`` after ``timeout`` seconds)."""
    future = _RESOLVERS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout=timeout)
    except FutureTimeout:
        future.cancel()
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)))
