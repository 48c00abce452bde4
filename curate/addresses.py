"""The private-address guard: URLs whose host is a literal loopback, private, link-local or
cloud-metadata address are not fetched (server-side request forgery from a crowd-sourced URL list).

Only literal hosts are judged here, without DNS; `netguard` checks every connection after name resolution
and on every redirect hop.
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

PRIVATE_HOSTNAMES = frozenset({"localhost", "localhost.localdomain", "metadata.google.internal", "metadata"})

# scheme://[userinfo@]host — the host is group 1 (brackets kept for IPv6)
_HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#@]*@)?(?P<host>\[[^\]]*\]|[^/?#:]*)"
# hosts worth a closer look: IP literals in any notation, or the named ones
_SUSPECT_PATTERN = (
    r"^(\[.*\]|[0-9a-fA-FxX.\s]+|.*localhost\.?\s*|localhost\.localdomain\.?\s*"
    r"|metadata(\.google\.internal)?\.?\s*|.*[^\x00-\x7F].*)$"
)


def normalize_host(host: str) -> str:
    """A host as urllib and the resolver see it: NFKC (full-width, circled digits), no surrounding spaces,
    no IPv6 brackets, lower case, no trailing dots. The table check, the allow-list and the connect-time
    guard all compare hosts in this form."""
    host = unicodedata.normalize("NFKC", str(host)).strip().lower().rstrip(".").strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_private_host(host: str) -> bool:
    """Is `host` (from a URL, IPv6 possibly in brackets) a loopback/private/link-local/multicast/reserved/
    metadata address? Normalised first as urllib and the resolver would: NFKC (full-width and circled
    digits), case, surrounding spaces, trailing dots."""
    host = normalize_host(host)
    if host in PRIVATE_HOSTNAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        address = _legacy_ipv4(host)
        if address is None:
            return False
    if isinstance(address, ipaddress.IPv6Address):  # IPv4 carried inside IPv6: mapped, 6to4, Teredo
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            address = embedded
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or address in ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, also used by some clouds
    )


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 written as the C resolver also accepts it: 2130706433, 0x7f.1, 0177.0.0.1, 127.1."""
    if not host or any(c not in "0123456789abcdefx." for c in host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def private_address_mask(urls: pa.Array | pa.ChunkedArray, allowed: frozenset = frozenset()) -> pa.Array:
    """Boolean mask over `urls`: True where the URL's host is private and its (host, port) is not in
    `allowed` (see `netguard.parse_allow_hosts`). Vectorised; Python only for suspect hosts."""
    hosts = pc.struct_field(pc.extract_regex(urls, _HOST_PATTERN), [0])
    suspects = pc.fill_null(pc.match_substring_regex(hosts, _SUSPECT_PATTERN, ignore_case=True), False)
    mask = [False] * len(urls)
    for i in pc.indices_nonzero(suspects).to_pylist():
        mask[i] = is_private_host(hosts[i].as_py()) and _host_port(urls[i].as_py()) not in allowed
    return pa.array(mask, type=pa.bool_())


def _host_port(url: str) -> tuple[str, int] | None:
    """(host, port) of a URL as urllib connects to it (default ports by scheme), or None if unparsable."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    return normalize_host(parts.hostname or ""), port
