"""The SSRF guard: checked with the address check alone, never by sending a request."""

import pytest

from core.reasons import Reason, SampleError
from ingest.fetcher import opt_out_directive
from ingest.safety import NetworkPolicy, check_url

DEFAULT = NetworkPolicy()
LOCAL_ONLY = NetworkPolicy.from_cidrs(["127.0.0.1/32"])


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",  # private
        "127.0.0.1", "127.0.0.2", "::1",  # loopback
        "169.254.169.254", "169.254.0.1", "fe80::1",  # link-local, cloud metadata
        "fd00:ec2::254", "fc00::1", "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255",
        "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped IPv6 does not sneak through
        "10.255.255.255", "172.20.1.1", "192.168.255.255", "169.254.170.2",  # ranges' far ends, ECS metadata
        "fdff:ffff::1", "fe80::1%eth0", "::ffff:127.0.0.1",  # fc00::/7's far end, scoped link-local
    ],
)
def test_non_public_addresses_are_refused_by_default(address):
    assert DEFAULT.refusal(address) is not None
    with pytest.raises(SampleError) as error:
        DEFAULT.check_address(address)
    assert error.value.reason is Reason.SSRF_BLOCKED


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34",
                                     "172.32.0.1", "11.0.0.1", "192.169.0.1"])  # just outside private ranges
def test_public_addresses_are_allowed(address):
    assert DEFAULT.refusal(address) is None


def test_allow_networks_opens_exactly_what_it_names():
    assert LOCAL_ONLY.refusal("127.0.0.1") is None
    assert LOCAL_ONLY.refusal("127.0.0.2") is not None
    assert LOCAL_ONLY.refusal("10.0.0.1") is not None
    assert LOCAL_ONLY.refusal("169.254.169.254") is not None


def test_bad_cidr_is_a_clear_error():
    with pytest.raises(ValueError, match="not a CIDR"):
        NetworkPolicy.from_cidrs(["127.0.0.1/33"])


@pytest.mark.parametrize(
    "url, reason",
    [
        ("ftp://example.com/a.jpg", Reason.UNSUPPORTED_SCHEME),
        ("file:///etc/passwd", Reason.UNSUPPORTED_SCHEME),
        ("gopher://127.0.0.1:6379/_", Reason.UNSUPPORTED_SCHEME),
        ("no-scheme.jpg", Reason.INVALID_URL),
        ("http://", Reason.INVALID_URL),
        ("http://example.com:99999/a.jpg", Reason.INVALID_URL),
        ("http://169.254.169.254/latest/meta-data/", Reason.SSRF_BLOCKED),
        ("http://[::1]:8080/", Reason.SSRF_BLOCKED),
        ("http://127.0.0.2:8765/img.jpg", Reason.SSRF_BLOCKED),
    ],
)
def test_url_checks(url, reason):
    with pytest.raises(SampleError) as error:
        check_url(url, LOCAL_ONLY)
    assert error.value.reason is reason


def test_allowed_ip_literal_passes():
    assert check_url("http://127.0.0.1:8765/a.jpg", LOCAL_ONLY) == "127.0.0.1"


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["noindex, noimageai"], "noimageai"),
        (["otherbot: noai"], None),  # scoped to someone else
        (["webclip-demo: noai"], "noai"),  # scoped to our token
        (["*: noimageai"], "noimageai"),
        (["nofollow"], None),
        ([], None),
    ],
)
def test_opt_out_directives(values, expected):
    assert opt_out_directive(values, ("noai", "noimageai"), "webclip-demo") == expected
