"""SSRF: a hostile-URL corpus against a real local server that counts what reaches it.

Nothing here sends traffic outside 127.0.0.0/8: addresses in other ranges are refused at the address check, and
"public" hosts are served by a stub resolver plus a transport that records and answers without connecting.
"""

from __future__ import annotations

import ipaddress
import time

import httpx
import pytest

from conftest_inputs import PNG_BODY, LocalServer, RecordingTransport, StubResolver, closed_port, local_server
from vlm_tools.errors import FetchFailed, ImageTooLarge, UrlBlocked
from vlm_tools.images.fetch import UrlFetcher, check_address, parse_ipv4_loose

__all__ = ["local_server"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(30)

PUBLIC_IP = "93.184.216.34"  # a globally routable address; only the recording transport ever "serves" it
PUBLIC_IP_2 = "198.51.100.7"  # documentation range: not global, so refused (used to prove every answer counts)


def _public_script(port: int):
    """Responses of the pretend public web, keyed by path (the recording transport calls this)."""
    redirects = {
        "/to-loopback": "http://127.0.0.1:{port}/img.png",
        "/to-localhost": "http://localhost:{port}/img.png",
        "/to-decimal": "http://2130706433:{port}/img.png",
        "/to-mapped": "http://[::ffff:127.0.0.1]:{port}/img.png",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-private": "http://10.1.2.3/x.png",
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://127.0.0.1:{port}/_GET",
        "/to-scheme-relative": "//127.0.0.1:{port}/img.png",
        "/to-userinfo": "http://public.test@127.0.0.1:{port}/img.png",
        "/to-rebound-name": "http://loopback.test:{port}/img.png",
    }

    def script(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in redirects:
            return httpx.Response(302, headers={"Location": redirects[path].format(port=port)})
        if path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            target = "/img.png" if left <= 0 else f"/hop/{left - 1}"
            return httpx.Response(301, headers={"Location": target})
        if path == "/img.png":
            return httpx.Response(200, content=PNG_BODY, headers={"Content-Type": "image/png"})
        return httpx.Response(404)

    return script


def _resolver() -> StubResolver:
    return StubResolver(
        {
            "public.test": [PUBLIC_IP],
            "localhost": ["127.0.0.1"],
            "127.0.0.1.nip.io": ["127.0.0.1"],
            "loopback.test": ["127.0.0.1"],
            "v6loopback.test": ["::1"],
            "mapped.test": ["::ffff:127.0.0.1"],
            "metadata.test": ["169.254.169.254"],
            "private.test": ["10.0.0.5"],
            "mixed.test": [PUBLIC_IP, "10.0.0.5"],
            "mixed-doc.test": [PUBLIC_IP, PUBLIC_IP_2],
            "zero.test": ["0.0.0.0"],
        }
    )


def _fetcher(port: int, *, allow_private: bool = False, max_bytes: int = 1_000_000, timeout_s: float = 5.0,
             resolver: StubResolver | None = None) -> tuple[UrlFetcher, RecordingTransport, StubResolver]:
    resolver = resolver or _resolver()
    transport = RecordingTransport(_public_script(port))
    fetcher = UrlFetcher(allow_private=allow_private, max_bytes=max_bytes, timeout_s=timeout_s,
                         resolver=resolver, transport=transport)  # fmt: skip
    return fetcher, transport, resolver


# (case id, URL template with {port}); every one must be refused with UrlBlocked and reach nothing local.
HOSTILE = [
    ("loopback-literal", "http://127.0.0.1:{port}/img.png"),
    ("loopback-other", "http://127.5.6.7:{port}/img.png"),
    ("localhost-name", "http://localhost:{port}/img.png"),
    ("localhost-upper-dot", "http://LOCALHOST.:{port}/img.png"),
    ("localhost-subdomain", "http://a.b.localhost:{port}/img.png"),
    ("short-127.1", "http://127.1:{port}/img.png"),
    ("short-127.0.1", "http://127.0.1:{port}/img.png"),
    ("octal", "http://0177.0.0.1:{port}/img.png"),
    ("octal-padded", "http://00000177.0.0.01:{port}/img.png"),
    ("hex-dotted", "http://0x7f.0.0.1:{port}/img.png"),
    ("hex-whole", "http://0x7f000001:{port}/img.png"),
    ("hex-upper", "http://0X7F.0X0.0X0.0X1:{port}/img.png"),
    ("decimal-whole", "http://2130706433:{port}/img.png"),
    ("octal-whole", "http://017700000001:{port}/img.png"),
    ("mixed-bases", "http://0177.0x0.1:{port}/img.png"),
    ("trailing-dot", "http://127.0.0.1.:{port}/img.png"),
    ("percent-encoded-host", "http://%31%32%37.0.0.1:{port}/img.png"),
    ("ipv6-loopback", "http://[::1]:{port}/img.png"),
    ("ipv6-loopback-long", "http://[0:0:0:0:0:0:0:1]:{port}/img.png"),
    ("ipv4-mapped-dotted", "http://[::ffff:127.0.0.1]:{port}/img.png"),
    ("ipv4-mapped-hex", "http://[::ffff:7f00:1]:{port}/img.png"),
    ("ipv4-compatible", "http://[::127.0.0.1]:{port}/img.png"),
    ("nat64-loopback", "http://[64:ff9b::7f00:1]:{port}/img.png"),
    ("6to4-loopback", "http://[2002:7f00:1::1]:{port}/img.png"),
    ("ipv6-zone-id", "http://[fe80::1%25lo]:{port}/img.png"),
    ("unspecified", "http://0.0.0.0:{port}/img.png"),
    ("unspecified-short", "http://0:{port}/img.png"),
    ("unspecified-v6", "http://[::]:{port}/img.png"),
    ("nip-io-style", "http://127.0.0.1.nip.io:{port}/img.png"),
    ("name-to-v6-loopback", "http://v6loopback.test:{port}/img.png"),
    ("name-to-mapped", "http://mapped.test:{port}/img.png"),
    ("name-to-zero", "http://zero.test:{port}/img.png"),
    ("userinfo-confusion", "http://evil.com@127.0.0.1:{port}/img.png"),
    ("userinfo-reversed", "http://127.0.0.1:{port}@public.test/img.png"),
    ("userinfo-backslash", "http://127.0.0.1\\@public.test/img.png"),
    ("userinfo-on-public", "http://user:pw@public.test/img.png"),
    ("ftp", "ftp://127.0.0.1:{port}/img.png"),
    ("file", "file:///etc/passwd"),
    ("file-localhost", "file://localhost/etc/passwd"),
    ("gopher", "gopher://127.0.0.1:{port}/_GET%20/img.png"),
    ("dict", "dict://127.0.0.1:{port}/info"),
    ("javascript", "javascript:fetch('http://127.0.0.1:{port}/img.png')"),
    ("no-scheme", "//127.0.0.1:{port}/img.png"),
    ("empty-host", "http:///img.png"),
    ("invalid-octal", "http://0128.0.0.1:{port}/img.png"),
    ("ipv4-out-of-range", "http://256.0.0.1:{port}/img.png"),
    ("decimal-out-of-range", "http://4294967296:{port}/img.png"),
    ("empty-label", "http://127..1:{port}/img.png"),
    ("private-10", "http://10.0.0.5/x.png"),
    ("private-172", "http://172.16.0.1/x.png"),
    ("private-192", "http://192.168.1.1/x.png"),
    ("cgnat", "http://100.64.0.1/x.png"),
    ("metadata-literal", "http://169.254.169.254/latest/meta-data/"),
    ("metadata-decimal", "http://2852039166/latest/meta-data/"),
    ("metadata-mapped", "http://[::ffff:a9fe:a9fe]/latest/meta-data/"),
    ("metadata-name", "http://metadata.test/latest/meta-data/"),
    ("private-name", "http://private.test/x.png"),
    ("one-bad-answer", "http://mixed.test/x.png"),
    ("one-non-global-answer", "http://mixed-doc.test/x.png"),
    ("link-local-v6", "http://[fe80::1]/x.png"),
    ("unique-local-v6", "http://[fd12:3456::1]/x.png"),
    ("multicast", "http://224.0.0.1/x.png"),
    ("multicast-v6", "http://[ff02::1]/x.png"),
    ("broadcast", "http://255.255.255.255/x.png"),
    ("reserved", "http://240.0.0.1/x.png"),
    ("documentation", "http://192.0.2.1/x.png"),
    ("6to4-private", "http://[2002:a00:1::]/x.png"),
    ("nat64-metadata", "http://[64:ff9b::a9fe:a9fe]/x.png"),
    # redirect chains: the first hop is "public" (recorded, never connected), the next must be refused
    ("redirect-to-loopback", "http://public.test/to-loopback"),
    ("redirect-to-localhost", "http://public.test/to-localhost"),
    ("redirect-to-decimal", "http://public.test/to-decimal"),
    ("redirect-to-mapped-v6", "http://public.test/to-mapped"),
    ("redirect-to-metadata", "http://public.test/to-metadata"),
    ("redirect-to-private-10", "http://public.test/to-private"),
    ("redirect-to-file", "http://public.test/to-file"),
    ("redirect-to-gopher", "http://public.test/to-gopher"),
    ("redirect-scheme-relative", "http://public.test/to-scheme-relative"),
    ("redirect-to-userinfo", "http://public.test/to-userinfo"),
    ("redirect-to-loopback-name", "http://public.test/to-rebound-name"),
]


@pytest.mark.parametrize("template", [t for _, t in HOSTILE], ids=[name for name, _ in HOSTILE])
async def test_hostile_url_refused_and_nothing_reaches_the_server(template: str, local_server: LocalServer) -> None:
    url = template.format(port=local_server.port)
    fetcher, transport, _ = _fetcher(local_server.port)
    try:
        with pytest.raises(UrlBlocked) as caught:
            await fetcher.fetch(url)
    finally:
        await fetcher.aclose()
    assert str(caught.value).startswith("url_blocked: ")
    assert local_server.log.connections == 0
    assert local_server.log.requests == []
    assert transport.forwarded == []
    # Only the pretend-public first hop of a redirect chain may have been "sent", and never to a local address.
    assert all(r.url.host == PUBLIC_IP for r in transport.requests)


def test_hostile_corpus_is_large_enough() -> None:
    assert len(HOSTILE) >= 30
    assert len({name for name, _ in HOSTILE}) == len(HOSTILE)


async def test_localhost_via_system_resolver_is_refused(local_server: LocalServer) -> None:
    fetcher = UrlFetcher(allow_private=False, max_bytes=1000, timeout_s=5)
    try:
        with pytest.raises(UrlBlocked):
            await fetcher.fetch(f"http://localhost:{local_server.port}/img.png")
        with pytest.raises(UrlBlocked):
            await fetcher.fetch(f"http://0x7f.1:{local_server.port}/img.png")
    finally:
        await fetcher.aclose()
    assert local_server.log.connections == 0


async def test_blocked_message_names_url_reason_and_address() -> None:
    fetcher = UrlFetcher(allow_private=False, max_bytes=1000, timeout_s=5)
    try:
        with pytest.raises(UrlBlocked) as caught:
            await fetcher.fetch("http://10.0.0.5/x.png")
    finally:
        await fetcher.aclose()
    message = str(caught.value)
    assert message.startswith("url_blocked: http://10.0.0.5/x.png resolves to a private address (10.0.0.5)")
    assert message.endswith("only public http(s) URLs are fetched")


async def test_too_many_redirects_fail_after_five_hops(local_server: LocalServer) -> None:
    fetcher, transport, _ = _fetcher(local_server.port)
    try:
        with pytest.raises(FetchFailed, match="redirected more than 5 times"):
            await fetcher.fetch("http://public.test/hop/10")
    finally:
        await fetcher.aclose()
    assert len(transport.requests) == 6  # the first request and five followed redirects, no more
    assert local_server.log.connections == 0


async def test_five_redirects_on_public_hosts_are_followed(local_server: LocalServer) -> None:
    fetcher, transport, _ = _fetcher(local_server.port)
    try:
        body = await fetcher.fetch("http://public.test/hop/4")
    finally:
        await fetcher.aclose()
    assert body == PNG_BODY
    assert [r.url.path for r in transport.requests][-1] == "/img.png"
    assert len(transport.requests) == 6


async def test_dns_rebinding_connects_only_to_the_checked_address(local_server: LocalServer) -> None:
    """First answer public, later answers loopback: one lookup per hop, the connection uses that answer."""
    resolver = _resolver()
    resolver.table["rebind.test"] = lambda nth: [PUBLIC_IP] if nth == 1 else ["127.0.0.1"]
    fetcher, transport, _ = _fetcher(local_server.port, resolver=resolver)
    try:
        body = await fetcher.fetch("http://rebind.test/img.png")
    finally:
        await fetcher.aclose()
    assert body == PNG_BODY
    assert resolver.calls == ["rebind.test"]  # resolved once
    (request,) = transport.requests
    assert request.url.host == PUBLIC_IP  # connected to the checked address
    assert request.headers["host"] == "rebind.test"  # while naming the real host
    assert local_server.log.connections == 0


async def test_dns_rebinding_on_a_redirect_hop_is_rechecked(local_server: LocalServer) -> None:
    resolver = _resolver()
    resolver.table["rebind.test"] = lambda nth: [PUBLIC_IP] if nth == 1 else ["127.0.0.1"]

    def script(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "/again"})

    transport = RecordingTransport(script)
    fetcher = UrlFetcher(allow_private=False, max_bytes=1000, timeout_s=5, resolver=resolver, transport=transport)
    try:
        with pytest.raises(UrlBlocked, match="loopback"):
            await fetcher.fetch("http://rebind.test/first")
    finally:
        await fetcher.aclose()
    assert resolver.calls == ["rebind.test", "rebind.test"]
    assert [r.url.host for r in transport.requests] == [PUBLIC_IP]
    assert local_server.log.connections == 0


async def test_https_sends_sni_and_host_of_the_name_to_the_checked_ip() -> None:
    resolver = StubResolver({"secure.test": [PUBLIC_IP]})
    transport = RecordingTransport(lambda r: httpx.Response(200, content=PNG_BODY))
    fetcher = UrlFetcher(allow_private=False, max_bytes=10_000, timeout_s=5, resolver=resolver, transport=transport)
    try:
        assert await fetcher.fetch("https://secure.test:8443/a/b.png?x=1#frag") == PNG_BODY
    finally:
        await fetcher.aclose()
    (request,) = transport.requests
    assert request.url.scheme == "https"
    assert request.url.host == PUBLIC_IP
    assert request.url.port == 8443
    assert request.url.raw_path == b"/a/b.png?x=1"
    assert request.headers["host"] == "secure.test:8443"
    assert request.extensions["sni_hostname"] == "secure.test"


async def test_public_ipv6_literal_keeps_brackets_in_url_and_host_header() -> None:
    transport = RecordingTransport(lambda r: httpx.Response(200, content=PNG_BODY))
    fetcher = UrlFetcher(allow_private=False, max_bytes=10_000, timeout_s=5, resolver=StubResolver({}),
                         transport=transport)  # fmt: skip
    try:
        assert await fetcher.fetch("http://[2606:4700:4700::1111]/x.png") == PNG_BODY
    finally:
        await fetcher.aclose()
    (request,) = transport.requests
    assert request.url.host == "2606:4700:4700::1111"
    assert request.headers["host"] == "[2606:4700:4700::1111]"


async def test_system_resolver_end_to_end(local_server: LocalServer) -> None:
    """The default resolver (getaddrinfo; 'localhost' never leaves the machine) with private addresses allowed."""
    from vlm_tools.images.fetch import system_resolve

    assert all(ipaddress.ip_address(a).is_loopback for a in await system_resolve("localhost", 80))
    fetcher = UrlFetcher(allow_private=True, max_bytes=10_000, timeout_s=5)
    try:
        assert await fetcher.fetch(f"http://localhost:{local_server.port}/img.png") == PNG_BODY
    finally:
        await fetcher.aclose()
    assert local_server.log.hosts == [f"localhost:{local_server.port}"]


async def test_unresolvable_name_fails_to_fetch() -> None:
    fetcher = UrlFetcher(allow_private=False, max_bytes=1000, timeout_s=5, resolver=StubResolver({}))
    try:
        with pytest.raises(FetchFailed, match="cannot resolve"):
            await fetcher.fetch("http://nowhere.test/x.png")
    finally:
        await fetcher.aclose()


# --- positive cases against the real local server (allow_private=True) ---------------------------------------


async def test_real_png_is_fetched(local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True)
    try:
        assert await fetcher.fetch(f"{local_server.base}/img.png") == PNG_BODY
    finally:
        await fetcher.aclose()
    assert local_server.log.requests == ["/img.png"]


async def test_name_is_resolved_once_and_sent_as_host_header(local_server: LocalServer) -> None:
    fetcher, _, resolver = _fetcher(local_server.port, allow_private=True)
    try:
        assert await fetcher.fetch(f"http://loopback.test:{local_server.port}/img.png") == PNG_BODY
    finally:
        await fetcher.aclose()
    assert resolver.calls == ["loopback.test"]
    assert local_server.log.hosts == [f"loopback.test:{local_server.port}"]


async def test_redirects_within_the_limit_are_followed(local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True)
    try:
        assert await fetcher.fetch(f"{local_server.base}/redirect/3") == PNG_BODY
    finally:
        await fetcher.aclose()
    assert local_server.log.requests == ["/redirect/3", "/redirect/2", "/redirect/1", "/redirect/0", "/img.png"]


async def test_real_server_redirect_chain_over_the_limit_fails(local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True)
    try:
        with pytest.raises(FetchFailed, match="more than 5"):
            await fetcher.fetch(f"{local_server.base}/redirect/9")
    finally:
        await fetcher.aclose()
    assert len(local_server.log.requests) == 6


async def test_redirect_from_public_to_metadata_refused_even_when_private_allowed(local_server: LocalServer) -> None:
    fetcher, transport, _ = _fetcher(local_server.port, allow_private=True)
    try:
        with pytest.raises(UrlBlocked, match="link-local"):
            await fetcher.fetch("http://public.test/to-metadata")
    finally:
        await fetcher.aclose()
    assert [r.url.host for r in transport.requests] == [PUBLIC_IP]


async def test_public_redirect_to_local_server_followed_when_private_allowed(local_server: LocalServer) -> None:
    fetcher, transport, _ = _fetcher(local_server.port, allow_private=True)
    try:
        assert await fetcher.fetch("http://public.test/to-loopback") == PNG_BODY
    finally:
        await fetcher.aclose()
    assert len(transport.forwarded) == 1
    assert local_server.log.requests == ["/img.png"]


@pytest.mark.parametrize("route", ["/big-chunked", "/big-no-length"], ids=["chunked", "no-content-length"])
async def test_body_over_cap_stops_while_streaming(route: str, local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True, max_bytes=200_000)
    started = time.monotonic()
    try:
        with pytest.raises(ImageTooLarge, match="200,000"):
            await fetcher.fetch(local_server.base + route)
    finally:
        await fetcher.aclose()
    assert time.monotonic() - started < 5
    time.sleep(0.2)  # let the server notice the closed connection
    # The server would send 8 MB; the client hung up long before (socket buffers let a little more through:
    # about 0.3 MB measured).
    assert local_server.log.streamed < 2_000_000


async def test_small_lying_content_length_reads_no_more_than_declared(local_server: LocalServer) -> None:
    """The server declares 10 bytes and keeps sending: the client takes the 10 and stops."""
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True, max_bytes=200_000)
    try:
        assert len(await fetcher.fetch(local_server.base + "/lying-small-length")) == 10
    finally:
        await fetcher.aclose()


async def test_declared_oversize_body_refused_before_reading(local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True, max_bytes=100_000)
    try:
        with pytest.raises(ImageTooLarge, match="50,000,000"):
            await fetcher.fetch(local_server.base + "/big-declared")
    finally:
        await fetcher.aclose()


@pytest.mark.parametrize("route", ["/slow-body", "/slow-headers"], ids=["trickled-body", "late-headers"])
async def test_slow_server_times_out_fast(route: str, local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True, timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(FetchFailed, match="timed out"):
            await fetcher.fetch(local_server.base + route)
    finally:
        await fetcher.aclose()
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    ("route", "pattern"),
    [("/missing", "HTTP 404"), ("/error", "HTTP 500"), ("/redirect-no-location", "without a Location")],
    ids=["404", "500", "redirect-without-location"],
)
async def test_http_errors_fail_to_fetch(route: str, pattern: str, local_server: LocalServer) -> None:
    fetcher, _, _ = _fetcher(local_server.port, allow_private=True)
    try:
        with pytest.raises(FetchFailed, match=pattern):
            await fetcher.fetch(local_server.base + route)
    finally:
        await fetcher.aclose()


async def test_connection_refused_fails_to_fetch() -> None:
    fetcher = UrlFetcher(allow_private=True, max_bytes=1000, timeout_s=5)
    try:
        with pytest.raises(FetchFailed, match="could not be reached"):
            await fetcher.fetch(f"http://127.0.0.1:{closed_port()}/img.png")
    finally:
        await fetcher.aclose()


# --- the address check and the IPv4 parser on their own ----------------------------------------------------

ADDRESSES = [
    # (id, address, allowed when allow_private=False, allowed when allow_private=True)
    ("public-v4", "8.8.8.8", True, True),
    ("public-v4-b", PUBLIC_IP, True, True),
    ("public-v6", "2606:4700:4700::1111", True, True),
    ("mapped-public", "::ffff:8.8.8.8", True, True),
    ("loopback", "127.0.0.1", False, True),
    ("loopback-high", "127.255.255.254", False, True),
    ("private-10", "10.1.2.3", False, True),
    ("private-172", "172.31.255.255", False, True),
    ("private-192", "192.168.0.1", False, True),
    ("cgnat", "100.100.100.100", False, True),
    ("loopback-v6", "::1", False, True),
    ("unique-local", "fd00::1", False, True),
    ("mapped-loopback", "::ffff:127.0.0.1", False, True),
    ("documentation", "203.0.113.9", False, True),
    ("unspecified", "0.0.0.0", False, False),
    ("zero-net", "0.1.2.3", False, False),
    ("unspecified-v6", "::", False, False),
    ("mapped-unspecified", "::ffff:0.0.0.0", False, False),
    ("link-local-metadata", "169.254.169.254", False, False),
    ("link-local-v6", "fe80::1", False, False),
    ("link-local-v6-zone", "fe80::1%eth0", False, False),
    ("mapped-metadata", "::ffff:169.254.169.254", False, False),
    ("6to4-metadata", "2002:a9fe:a9fe::1", False, False),
    ("multicast", "239.1.2.3", False, False),
    ("multicast-v6", "ff05::2", False, False),
    ("broadcast", "255.255.255.255", False, False),
    ("reserved", "250.1.2.3", False, False),
    ("not-an-ip", "localhost", False, False),
]


@pytest.mark.parametrize(
    ("address", "public_ok", "private_ok"),
    [a[1:] for a in ADDRESSES],
    ids=[a[0] for a in ADDRESSES],
)
def test_check_address(address: str, public_ok: bool, private_ok: bool) -> None:
    for allow_private, ok in ((False, public_ok), (True, private_ok)):
        if ok:
            check_address(address, allow_private=allow_private)
        else:
            with pytest.raises(UrlBlocked):
                check_address(address, allow_private=allow_private)


IPV4_SPELLINGS = [
    ("dotted", "127.0.0.1", "127.0.0.1"),
    ("three-parts", "127.0.1", "127.0.0.1"),
    ("two-parts", "127.1", "127.0.0.1"),
    ("one-part", "2130706433", "127.0.0.1"),
    ("octal-parts", "0177.0.0.01", "127.0.0.1"),
    ("octal-whole", "017700000001", "127.0.0.1"),
    ("hex-parts", "0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("hex-whole", "0x7F000001", "127.0.0.1"),
    ("mixed", "0x7f.0.01", "127.0.0.1"),
    ("two-parts-24bit", "10.65535", "10.0.255.255"),
    ("zero", "0", "0.0.0.0"),
    ("metadata-decimal", "2852039166", "169.254.169.254"),
]


@pytest.mark.parametrize(("text", "expected"), [s[1:] for s in IPV4_SPELLINGS], ids=[s[0] for s in IPV4_SPELLINGS])
def test_ipv4_spellings_normalise_like_inet_aton(text: str, expected: str) -> None:
    assert parse_ipv4_loose(text) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    "text",
    ["256.0.0.1", "1.2.3.4.5", "4294967296", "08.0.0.1", "127..1", "1.256.1", "0x1ffffffff", "٣.0.0.1"],
    ids=["part-over-255", "five-parts", "over-32-bits", "bad-octal", "empty-part", "middle-over-255",
         "hex-over-32-bits", "unicode-digit"],
)  # fmt: skip
def test_invalid_numeric_hosts_raise(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ipv4_loose(text)


@pytest.mark.parametrize("text", ["example.com", "a1.b2", "1.2.3.com", "localhost"])
def test_names_are_not_numbers(text: str) -> None:
    assert parse_ipv4_loose(text) is None
