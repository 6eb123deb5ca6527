"""The SSRF rules: which webhook URLs are refused, and that deciding so resolves names but connects nowhere."""

from __future__ import annotations

import socket

import pytest

from app.settings import Settings
from app.webhooks import policy
from app.webhooks.policy import UrlRefused


def _settings(**changes) -> Settings:
    return Settings().model_copy(update=changes)


def _public(host, port, timeout):
    return ["93.184.216.34"]


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.1.1.1", "private"),
    ("2002:a9fe:a9fe::", "link-local"), ("64:ff9b::a00:1", "private"), ("64:ff9b:1::1", "NAT64"),
])
def test_internal_addresses_are_refused(address, why):
    assert why in policy.refusal(address)
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UrlRefused, match=why) as exc:
        policy.check(f"https://{host}/hook", _settings())
    assert exc.value.code == "invalid_webhook_url" and exc.value.status == 422


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert policy.refusal(address) is None


@pytest.mark.parametrize("url, why", [
    ("http://hooks.example.com/x", "https://"), ("ftp://hooks.example.com/x", "https://"),
    ("javascript:alert(1)", "https://"), ("hooks.example.com/x", "https://"),
    ("https://user:pass@hooks.example.com/x", "credentials"), ("https://user@hooks.example.com/x", "credentials"),
    ("https://hooks.example.com/" + "a" * 2100, "2048"), ("https://hooks.example.com/a b", "whitespace"),
    ("https://hooks.example.com\\@127.0.0.1/", "backslash"), ("https://hooks.example.com:0/", "port"),
    ("https://hooks.example.com:70000/", "malformed"), ("https:///path", "no host"),
    ("https://hooks.exa_mple%2e.com/", "not a valid domain"), ("https://[::1/", "malformed"),
])
def test_malformed_or_unsafe_urls_are_refused_before_any_lookup(url, why, monkeypatch):
    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: looked_up.append(a) or [])
    with pytest.raises(UrlRefused, match=why):
        policy.check(url, _settings())
    assert looked_up == []


def test_http_only_where_allowed():
    assert policy.check("http://hooks.example.com/x", _settings(webhook_allow_http=True), _public).scheme == "http"


def test_a_name_resolving_to_an_internal_address_is_refused_by_resolving_only(monkeypatch):
    """``localhost`` (and numeric spellings of 127.0.0.1) are looked up with getaddrinfo; no socket connects."""
    lookups, connects = [], []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: lookups.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: connects.append(addr) or 0)
    for url in ("https://localhost/hook", "https://LOCALHOST./hook", "https://2130706433/hook",
                "https://0x7f.1/hook", "https://127.1:9/hook"):
        with pytest.raises(UrlRefused, match="loopback"):
            policy.check(url, _settings())
    assert lookups == ["localhost", "localhost", "2130706433", "0x7f.1", "127.1"]
    assert connects == []


def test_one_internal_answer_among_public_ones_is_enough_to_refuse():
    with pytest.raises(UrlRefused, match="10.0.0.7"):
        policy.check("https://hooks.example.com/", _settings(),
                     lambda host, port, timeout: ["93.184.216.34", "10.0.0.7"])


def test_an_allow_listed_host_skips_the_address_rules_but_is_still_resolved():
    s = _settings(webhook_allowed_hosts=["receiver.internal", "0:0:0:0:0:0:0:1"])
    dest = policy.check("https://Receiver.Internal:8443/in?x=1", s, lambda host, port, timeout: ["10.2.3.4"])
    assert (dest.host, dest.port, dest.target, dest.address) == ("receiver.internal", 8443, "/in?x=1", "10.2.3.4")
    assert dest.pinned_url == "https://10.2.3.4:8443/in?x=1" and dest.host_header == "receiver.internal:8443"
    assert policy.check("https://[::1]/", s).address == "::1"  # IP literals compare as addresses
    with pytest.raises(UrlRefused, match="loopback"):
        policy.check("https://127.0.0.1/", s)  # allowing one host allows no other


def test_a_host_that_does_not_resolve_is_refused():
    def fail(host, port, timeout):
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(UrlRefused, match="does not resolve"):
        policy.check("https://nowhere.invalid/", _settings(), fail)


def test_a_lookup_that_hangs_is_bounded(monkeypatch):
    import threading

    gate = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: gate.wait(10) or [])
    try:
        with pytest.raises(UrlRefused, match="TimeoutError"):
            policy.check("https://slow.example/", _settings(webhook_timeout_seconds=0.2))
    finally:
        gate.set()


def test_unicode_hosts_are_idna_encoded():
    assert policy.check("https://bücher.example/", _settings(), _public).host == "xn--bcher-kva.example"
