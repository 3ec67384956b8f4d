"""Outbound address rules: what URI ingest and webhooks may connect to."""

from __future__ import annotations

import socket

import pytest

from moments.core import errors
from moments.core.netrules import check_url, parse_networks

LOOPBACK = parse_networks("127.0.0.0/8,::1")


def fake_dns(table):
    def resolve(host, port, type=0):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, type, 0, "", (a, port)) for a in table[host]]
    return resolve


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/", "scheme"),
    ("https://user:pw@example.com/x", "credentials"),
    ("https:///nohost", "no host"),
    ("https://[::1]:99999/", "malformed"),
])
def test_bad_urls_are_invalid_argument(url, reason):
    with pytest.raises(errors.InvalidArgument) as err:
        check_url(url, schemes=("https", "http"), allow=(), field="source_uri",
                  resolve=fake_dns({"example.com": ["93.184.216.34"]}))
    assert reason in err.value.message and err.value.field == "source_uri"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.8", "172.16.3.4", "192.168.1.1", "169.254.169.254",
                                     "::1", "fe80::1", "fc00::5", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1"])
def test_private_loopback_and_link_local_are_refused(address):
    with pytest.raises(errors.InvalidArgument) as err:
        check_url("https://media.example/v.mp4", schemes=("https",), allow=(), field="u",
                  resolve=fake_dns({"media.example": [address]}))
    assert "private, loopback or link-local" in err.value.message


def test_one_private_address_among_public_ones_is_refused():
    with pytest.raises(errors.InvalidArgument):
        check_url("https://media.example/", schemes=("https",), allow=(), field="u",
                  resolve=fake_dns({"media.example": ["93.184.216.34", "10.1.1.1"]}))


def test_allow_list_and_public_addresses_pass():
    target = check_url("http://localhost:8080/a", schemes=("http",), allow=LOOPBACK, field="u",
                       resolve=fake_dns({"localhost": ["127.0.0.1", "::1"]}))
    assert (target.host, target.port, target.addresses) == ("localhost", 8080, ("127.0.0.1", "::1"))
    public = check_url("https://media.example/v", schemes=("https",), allow=(), field="u",
                       resolve=fake_dns({"media.example": ["93.184.216.34"]}))
    assert public.port == 443 and public.addresses == ("93.184.216.34",)


def test_real_resolution_of_loopback_needs_the_allow_list():
    with pytest.raises(errors.InvalidArgument):
        check_url("http://127.0.0.1:1/", schemes=("http",), allow=(), field="u")
    assert check_url("http://127.0.0.1:1/", schemes=("http",), allow=LOOPBACK, field="u").addresses == ("127.0.0.1",)


def test_allow_list_entries_are_checked():
    with pytest.raises(ValueError):
        parse_networks("127.0.0.0/8, not-a-network")
