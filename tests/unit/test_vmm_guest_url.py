"""The VMM's one rewrite of the URLs a VM is given (agents/vmm/service.py guest_url): a loopback host
becomes the host's address on the VM's network; nothing else changes."""

import pytest

from ansible_collections.dstack.tee.agents.vmm.service import guest_url, is_loopback_host

HOST = "10.0.2.2"


@pytest.mark.parametrize("url, expected", [
    ("https://127.0.0.1:9201", "https://10.0.2.2:9201"),
    ("https://127.8.9.10:9201/prpc", "https://10.0.2.2:9201/prpc"),
    ("http://localhost:9080/host-api", "http://10.0.2.2:9080/host-api"),
    ("http://LOCALHOST:9080/host-api", "http://10.0.2.2:9080/host-api"),
    ("https://[::1]:9202/x?y=1#z", "https://10.0.2.2:9202/x?y=1#z"),
    ("https://127.0.0.1", "https://10.0.2.2"),
    ("http://user:pw@127.0.0.1:1/a", "http://user:pw@10.0.2.2:1/a"),
])
def test_a_loopback_host_becomes_the_hosts_address_on_the_vms_network(url, expected):
    assert guest_url(url, HOST) == expected


@pytest.mark.parametrize("url", [
    "https://kms.example.com:9201", "https://10.1.2.3:9201", "https://[2001:db8::1]:9202", "https://localhost.example:1",
    "https://127.0.0.1:notaport", "",
])
def test_other_urls_are_left_as_they_are(url):
    assert guest_url(url, HOST) == url


def test_a_vm_that_shares_the_hosts_loopback_gets_the_urls_unchanged():
    assert guest_url("https://127.0.0.1:9201", None) == "https://127.0.0.1:9201"


def test_an_ipv6_host_address_is_bracketed():
    assert guest_url("https://127.0.0.1:9201/", "fd00::2") == "https://[fd00::2]:9201/"


def test_loopback_hosts():
    assert all(map(is_loopback_host, ("127.0.0.1", "127.255.0.1", "::1", "[::1]", "localhost", "Localhost")))
    assert not any(map(is_loopback_host, ("10.0.2.2", "0.0.0.0", "example.com", "", None)))
