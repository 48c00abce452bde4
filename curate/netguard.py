"""The connect-time guard: no download connection to a private address, whatever the URL table says.

The table check (`addresses.private_address_mask`) judges a URL's literal host. It cannot see a public
name that resolves to 127.0.0.1, nor a redirect from an allowed URL to `http://10.0.0.5/`. This guard
sits where every HTTP(S) connection of a download worker is opened (`socket.create_connection`, which
urllib's connections use, so every redirect hop passes through it too): it resolves the host itself,
refuses if any resolved address is loopback, private, link-local, multicast, reserved or unspecified, and
connects to the addresses it checked (no second lookup a rebinding DNS server could answer differently).

Exceptions are explicit: `allow_hosts` holds `HOST:PORT` entries (a test's own loopback server); a
connection to that host, spelled so in the URL, on that port, is allowed, and nothing else private is (a
name that resolves to an allowed address is still refused).

img2dataset runs its downloads in spawned worker processes; `guarded_downloader.GuardedDownloader`
(img2dataset's Downloader, which img2dataset pickles to each worker) installs the guard in the worker
before its first download. The resolver is injectable (`resolver`: "module:function", getaddrinfo's signature) so tests
can map names to loopback without touching /etc/hosts.
"""

from __future__ import annotations

import importlib
import socket

from latentmill.curate.addresses import is_private_host, normalize_host
from latentmill.errors import InputError

REFUSED = "private_address"


class PrivateAddressRefused(OSError):
    """A connection the guard refused; its text starts with `private_address:` (the failure reason)."""


_state: dict = {
    "installed": False,
    "allowed": frozenset(),
    "resolver": None,
    "original": socket.create_connection,
}


def parse_allow_hosts(entries) -> frozenset[tuple[str, int]]:
    """`HOST:PORT` strings (IPv6 in brackets: `[::1]:8080`) -> {(host, port)}; InputError naming a bad one."""
    allowed = set()
    for entry in entries or ():
        host, sep, port = str(entry).strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--allow-host {entry!r}: write HOST:PORT, e.g. 127.0.0.1:8765.")
        allowed.add((normalize_host(host), int(port)))
    return frozenset(allowed)


def _resolver():
    spec = _state["resolver"]
    if not spec:
        return socket.getaddrinfo
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def check_connection(host: str, port: int) -> list[tuple]:
    """The addresses to connect to for (host, port): getaddrinfo results, every one checked. Raises
    PrivateAddressRefused if any is private and the host is not allowed."""
    name = normalize_host(host)
    infos = _resolver()(host, port, 0, socket.SOCK_STREAM)
    allowed = _state["allowed"]
    if (name, port) in allowed:
        return infos
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        if is_private_host(address):
            raise PrivateAddressRefused(
                f"{REFUSED}: {host}:{port} resolves to {address}, a loopback, private, "
                f"link-local or reserved address; not fetched (--allow-host {name}:{port} "
                f"allows it)"
            )
    return infos


def guarded_create_connection(
    address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args, **kwargs
):
    """`socket.create_connection` with the guard: connect only to checked addresses."""
    host, port = address[0], int(address[1])
    error = None
    for family, kind, proto, _, sockaddr in check_connection(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            error = err
            sock.close()
    raise error or OSError(f"{host}:{port}: no address to connect to")


def install(allow_hosts=(), resolver: str | None = None) -> None:
    """Guard every connection this process opens through socket.create_connection (idempotent)."""
    _state["allowed"] = parse_allow_hosts(allow_hosts)
    _state["resolver"] = resolver
    if not _state["installed"]:
        socket.create_connection = guarded_create_connection
        _state["installed"] = True


def uninstall() -> None:
    """Put socket.create_connection back (tests that install the guard in their own process)."""
    socket.create_connection = _state["original"]
    _state.update(installed=False, allowed=frozenset(), resolver=None)


def allow_hosts_field(allowed: str, refused: str):
    """The `allow_hosts` option of the stages that take URLs (prefilter, download)."""
    from latentmill.schema import opt

    return opt(
        factory=list,
        flag="--allow-host",
        metavar="HOST:PORT",
        help=f"{allowed} this one loopback/private host and port (repeatable), e.g. your own test server "
        f"127.0.0.1:8765; every other private address {refused}.",
    )
