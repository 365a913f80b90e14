"""Which addresses a downloader may connect to: the SSRF guard.

A URL list is untrusted input: a row pointing at ``http://169.254.169.254/`` (cloud
metadata), ``http://10.0.0.5/admin`` or ``http://localhost:6379/`` would make our
workers attack their own network. So every address a request would connect to —
after DNS resolution, and again for every redirect — must be a public unicast
address, unless it lies inside a network the operator explicitly allowed
(``--allow_networks 127.0.0.1/32`` for a local test server).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.reasons import Reason, SampleError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")

# Named explicitly (not only via is_private) so the refusal reason is precise and the
# list is reviewable; is_global below catches the rest of the reserved space.
BLOCKED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("ff00::/8", "multicast"),
)


@dataclass(frozen=True)
class NetworkPolicy:
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> "NetworkPolicy":
        networks = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR network such as 127.0.0.1/32") from None
        return cls(tuple(networks))

    def refusal(self, address: str) -> str | None:
        """Why ``address`` may not be contacted, or None when it may."""
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed):
            return None
        for cidr, label in BLOCKED_NETWORKS:
            if ip in ipaddress.ip_network(cidr):
                return f"{ip} is {label} ({cidr})"
        if not ip.is_global:
            return f"{ip} is not a public address"
        return None

    def check_address(self, address: str) -> None:
        why = self.refusal(address)
        if why:
            raise SampleError(Reason.SSRF_BLOCKED, why)


def check_url(url: str, policy: NetworkPolicy) -> str:
    """Validate scheme and, for IP-literal hosts, the address; return the host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise SampleError(Reason.INVALID_URL, str(exc)) from None
    if not parts.scheme:
        raise SampleError(Reason.INVALID_URL, "no scheme")
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise SampleError(Reason.UNSUPPORTED_SCHEME, parts.scheme or "no scheme")
    if not host:
        raise SampleError(Reason.INVALID_URL, "no host")
    if is_ip_literal(host):
        policy.check_address(host)
    return host


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False
