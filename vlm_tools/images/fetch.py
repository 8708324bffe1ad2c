"""SSRF-safe fetching of user-given http(s) URLs.

A server that fetches a URL an agent (or a prompt-injected page) chose must never become a proxy into the
network it runs in; :class:`UrlFetcher` holds the rules that see to it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
import httpx

from ..errors import FetchFailed, ImageTooLarge, UrlBlocked

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``async resolve(host, port) -> [ip, ...]``: the only name lookup a fetch makes."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEMES = ("http", "https")
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_POLICY = "only public http(s) URLs are fetched"

_ZERO_NET = ipaddress.IPv4Network("0.0.0.0/8")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


# --- addresses ---------------------------------------------------------------------------------------------


def check_address(ip: str, *, allow_private: bool) -> None:
    """Raise :class:`~vlm_tools.errors.UrlBlocked` unless ``ip`` may be connected to.

    Always refused: unspecified (``0.0.0.0/8``, ``::``), multicast, broadcast, reserved and link-local addresses
    (169.254.0.0/16 holds the cloud metadata service; fe80::/10), also when embedded in an IPv6 address.
    Refused unless ``allow_private``: loopback, private (RFC 1918), shared (100.64.0.0/10), unique-local and any
    other address that is not globally routable.
    """
    problem = address_problem(_parse_ip(ip), allow_private=allow_private)
    if problem is not None:
        raise UrlBlocked(f"{ip} is {problem}; {_POLICY}")


def address_problem(addr: IPAddress, *, allow_private: bool) -> str | None:
    """Why ``addr`` must not be connected to (e.g. ``"a private address"``), or ``None`` when it may."""
    if isinstance(addr, ipaddress.IPv6Address):
        return _ipv6_problem(addr, allow_private)
    if addr in _ZERO_NET or addr.is_unspecified:
        return "an unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if addr.is_link_local:
        return "a link-local (cloud metadata) address"
    if addr.is_reserved:
        return "a reserved address"
    if allow_private:
        return None
    if addr.is_loopback:
        return "a loopback address"
    if addr in _CGNAT:
        return "a shared (carrier-grade NAT) address"
    if addr.is_private:
        return "a private address"
    if not addr.is_global:
        return "a non-public address"
    return None


def _ipv6_problem(addr: ipaddress.IPv6Address, allow_private: bool) -> str | None:
    if addr.scope_id:
        return "an IPv6 address with a zone id"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_link_local or addr in _SITE_LOCAL:
        return "a link-local address"
    if addr.is_loopback:
        return None if allow_private else "a loopback address"
    embedded = _embedded_ipv4(addr)
    if embedded is not None:
        problem = address_problem(embedded, allow_private=allow_private)
        if problem is not None:
            return f"{problem} in IPv6 form, embedding {embedded}"
    if allow_private:
        return None
    if addr in _UNIQUE_LOCAL:
        return "a unique-local address"
    if addr in _NAT64_LOCAL or addr in _NAT64:
        return "a NAT64 address"
    if addr.is_private:
        return "a private address"
    if not addr.is_global:
        return "a non-public address"
    return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the embedding forms."""
    if addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return addr.ipv4_mapped
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if int(addr) >> 32 == 0:  # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks)
        return low32
    if addr in _NAT64 or addr in _SIIT:
        return low32
    if addr.sixtofour is not None:  # 2002:AABB:CCDD::/48
        return addr.sixtofour
    if addr.teredo is not None:  # 2001::/32: (server, client)
        return addr.teredo[1]
    return None


def _parse_ip(ip: str) -> IPAddress:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise UrlBlocked(f"{ip!r} is not an IP address; {_POLICY}") from None


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Parse ``host`` as libc ``inet_aton`` would, or return ``None`` when it is a name, not a number.

    Accepts 1–4 dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``); the last part fills the
    remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` is 127.0.0.1). Raises ``ValueError`` for a host
    whose last label is numeric but which is not a valid address (``256.1.1.1``), which no resolver should see.
    """
    parts = host.split(".")
    if not parts or not _numeric_label(parts[-1]):
        return None
    if len(parts) > 4 or not all(_numeric_label(p) for p in parts):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    values = [_label_value(p) for p in parts]
    last_bits = 8 * (5 - len(values))
    if any(v > 255 for v in values[:-1]) or values[-1] >= 1 << last_bits:
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    number = 0
    for v in values[:-1]:
        number = (number << 8) | v
    number = (number << last_bits) | values[-1]
    return ipaddress.IPv4Address(number)


def _numeric_label(label: str) -> bool:
    if label[:2] in ("0x", "0X"):
        return all(c in "0123456789abcdefABCDEF" for c in label[2:])
    return label != "" and label.isascii() and label.isdigit()


def _label_value(label: str) -> int:
    if label[:2] in ("0x", "0X"):
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label[0] == "0":
        if any(c in "89" for c in label):
            raise ValueError(f"{label!r} is not a valid octal number")
        return int(label, 8)
    return int(label)


# --- URLs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and how to name the host on the wire."""

    url: httpx.URL  # as given (after parsing): redirects resolve against it
    host: str  # normalised host name or IP text, for Host / SNI
    addresses: tuple[str, ...]  # every one checked


def parse_url(raw: str) -> tuple[httpx.URL, str, IPAddress | None]:
    """Parse and vet a URL's form: ``(url, normalised host, IP literal or None)``; raises UrlBlocked."""
    shown = _short(raw)
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UrlBlocked(f"{shown} is not a valid URL ({exc}); {_POLICY}") from None
    if url.scheme not in _SCHEMES:
        what = f"uses the scheme {url.scheme!r}" if url.scheme else "has no scheme"
        raise UrlBlocked(f"{shown} {what}; {_POLICY}")
    if url.userinfo:
        raise UrlBlocked(f"{shown} carries user credentials (user@host), which are not allowed; {_POLICY}")
    try:
        host = unquote(url.raw_host.decode("ascii"), errors="strict").lower()
    except UnicodeDecodeError:
        raise UrlBlocked(f"{shown} has a host that is not valid; {_POLICY}") from None
    if not host:
        raise UrlBlocked(f"{shown} has no host; {_POLICY}")
    if ":" in host or "%" in host:  # only IPv6 literals contain these
        if "%" in host:
            raise UrlBlocked(f"{shown} names an IPv6 zone id; {_POLICY}")
        try:
            return url, host, ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlBlocked(f"{shown} has a host that is not valid; {_POLICY}") from None
    name = host[:-1] if host.endswith(".") else host
    try:
        ip = parse_ipv4_loose(name)
    except ValueError:
        raise UrlBlocked(f"{shown} has a numeric host that is not a valid IPv4 address; {_POLICY}") from None
    if ip is not None:
        return url, str(ip), ip
    if not _HOSTNAME.match(name) or len(name) > 253:
        raise UrlBlocked(f"{shown} has a host that is not a valid name; {_POLICY}")
    return url, name, None


async def system_resolve(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the system resolver (``getaddrinfo``), every address, in its order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


class UrlFetcher:
    """Fetch one http(s) URL under the SSRF rules, which apply, in this order, to every hop of a fetch:

    1. only ``http`` and ``https``; no ``user@host`` (a classic confusion trick); a non-empty host;
    2. the host is parsed here: every IPv4 spelling libc's ``inet_aton`` accepts (``2130706433``, ``0177.0.0.1``,
       ``0x7f.1``, ``127.1``) and every IPv6 form that embeds an IPv4 address (mapped, compatible, NAT64, 6to4,
       Teredo) is normalised before it is judged;
    3. a host name is resolved ONCE and every address it resolves to is checked (one bad address refuses the URL);
    4. the connection goes to the checked address: the request URL carries the IP literal, the ``Host`` header the
       original name, and for https the TLS SNI (and certificate check) the original name — so a second DNS answer
       (DNS rebinding) can never redirect the connection;
    5. redirects are followed here, not by httpx, so each hop goes through 1–4 again; at most ``max_redirects``;
    6. the body is streamed with the byte cap enforced while reading (a lying or missing ``Content-Length`` changes
       nothing) and the whole fetch, redirects included, runs under one deadline.

    Over the byte cap is :class:`~vlm_tools.errors.ImageTooLarge` (the same code as an over-large file or data
    URI); every other failure of a permitted URL is :class:`~vlm_tools.errors.FetchFailed`.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 5,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._max_redirects = max_redirects
        self._resolve = resolver or system_resolve
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,  # each hop is checked here
            trust_env=False,  # an environment proxy would connect by name, undoing the address check
            timeout=httpx.Timeout(timeout_s),
            # No pooling: a pooled TLS connection is keyed by IP, and could carry a request for another name.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={
                "User-Agent": "vlm-tools",
                "Accept": "image/*, application/pdf;q=0.9, */*;q=0.1",
                # Compressed bodies would inflate inside httpx before the cap sees them.
                "Accept-Encoding": "identity",
            },
        )

    async def fetch(self, url: str) -> bytes:
        """The body of ``url``; raises UrlBlocked, FetchFailed or ImageTooLarge."""
        try:
            with anyio.fail_after(self._timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise FetchFailed(
                f"{_short(url)} timed out after {self._timeout_s:g} s (--fetch-timeout-s); try again or send the "
                "image another way"
            ) from None

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def _fetch(self, original: str) -> bytes:
        current = original
        for hop in range(self._max_redirects + 1):
            target = await self._check(original, current)
            response = await self._send(original, target)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    current = self._next_hop(original, target, response)
                    logger.debug("redirect %d of %s -> %s", hop + 1, original, current)
                    continue
                if status >= 300:
                    raise FetchFailed(f"{_short(original)} answered HTTP {status} {response.reason_phrase}".rstrip())
                return await self._read_capped(original, response)
            finally:
                await response.aclose()
        raise FetchFailed(f"{_short(original)} redirected more than {self._max_redirects} times")

    async def _check(self, original: str, current: str) -> _Target:
        via = "" if current == original else f" (redirected to {_short(current)})"
        try:
            url, host, literal = parse_url(current)
        except UrlBlocked as exc:
            if current == original:
                raise
            raise UrlBlocked(f"{_short(original)} redirected to {exc.message}") from None
        if literal is not None:
            addresses = [str(literal)]
        elif (host == "localhost" or host.endswith(".localhost")) and not self._allow_private:
            raise UrlBlocked(f"{_short(original)}{via} names localhost; {_POLICY}")
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                addresses = await self._resolve(host, port)
            except (OSError, ValueError) as exc:  # gaierror; IDNA errors are ValueErrors
                raise FetchFailed(f"{_short(original)}{via}: cannot resolve {host} ({exc})") from None
            if not addresses:
                raise FetchFailed(f"{_short(original)}{via}: {host} resolves to no address")
        for ip in addresses:
            problem = address_problem(_parse_ip(ip), allow_private=self._allow_private)
            if problem is not None:
                raise UrlBlocked(f"{_short(original)}{via} resolves to {problem} ({ip}); {_POLICY}")
        return _Target(url=url, host=host, addresses=tuple(addresses))

    async def _send(self, original: str, target: _Target) -> httpx.Response:
        port = target.url.port
        host_header = _bracket(target.host) if port is None else f"{_bracket(target.host)}:{port}"
        last_error: Exception | None = None
        for ip in target.addresses:  # all checked; try them in the resolver's order
            request = self._client.build_request(
                "GET",
                target.url.copy_with(host=ip, fragment=None),
                headers={"Host": host_header},
                extensions={"sni_hostname": target.host} if target.url.scheme == "https" else {},
            )
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = exc
            except httpx.TimeoutException:
                raise FetchFailed(f"{_short(original)} timed out") from None
            except httpx.HTTPError as exc:
                raise FetchFailed(f"{_short(original)} could not be fetched ({type(exc).__name__}: {exc})") from None
        raise FetchFailed(f"{_short(original)} could not be reached ({last_error})")

    def _next_hop(self, original: str, target: _Target, response: httpx.Response) -> str:
        location = response.headers.get("location")
        if not location:
            raise FetchFailed(f"{_short(original)} answered a redirect without a Location")
        try:
            return str(target.url.join(location))
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise FetchFailed(f"{_short(original)} redirected to an invalid URL ({exc})") from None

    async def _read_capped(self, original: str, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise ImageTooLarge(self._too_big(original, int(declared)))
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > self._max_bytes:  # enforced on what arrives, whatever the headers said
                    raise ImageTooLarge(self._too_big(original, total))
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise FetchFailed(f"{_short(original)} timed out while reading the body") from None
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise FetchFailed(f"{_short(original)} failed while reading the body ({reason})") from None
        return b"".join(chunks)

    def _too_big(self, original: str, size: int) -> str:
        return (
            f"{_short(original)} is over {self._max_bytes:,} bytes ({size:,} or more; --max-fetch-bytes); "
            "send a smaller image"
        )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _short(text: str, limit: int = 200) -> str:
    """A URL for an error message: long ones (and data smuggled in them) cut short."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
