"""Joining a Ray cluster, checked first: the address's form, `auto`, a dashboard URL given by mistake, and
whether a Ray GCS answers there at all, each within a bounded time; then whether the work fits the cluster.

Ray's own `ray.init(address=...)` waits for a GCS without bound when nothing answers, and a placement
group that cannot be placed waits forever; every Ray entry point (`--executor ray`, `download
--distributor ray`, `run --executor ray`, `train --launcher ray`) comes through here instead, so a mistake
is exit 2 in seconds with the address, what was tried and the fix.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlparse

from latentmill.errors import InputError

CONNECT_TIMEOUT_S = 30.0
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_START = "start one with `ray start --head --port 6379` and give the address it prints (or set RAY_ADDRESS)"
# a client's HTTP/2 preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with its SETTINGS
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def checked_address(address: str, option: str = "--ray-address", timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """The address to give `ray.init`: `auto` resolved to the running cluster, the form checked, and a Ray
    server found answering there within `timeout_s`; anything else is an InputError saying what to give."""
    text = address.strip()
    if text == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            text = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            text = None
        if not text or text == "auto":
            raise InputError(
                f"{option} auto: no running Ray cluster found on this machine (nor RAY_ADDRESS); {_START}."
            )
    if text.startswith(("http://", "https://")):
        host = urlparse(text).hostname or "HEAD"
        raise InputError(
            f"{option} {address}: that is the Ray dashboard's address (HTTP), not the cluster's. Give the GCS "
            f"address `ray start --head` printed: {host}:6379 by default (or ray://{host}:10001 for Ray Client)."
        )
    client = text.startswith("ray://")
    host, port = _host_port(text[len("ray://") :] if client else text, address, option)
    _probe(host, port, address, option, timeout_s)
    return text


def _host_port(text: str, address: str, option: str) -> tuple[str, int]:
    form = f"{option} {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), auto, or ray://HOST:10001"
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        valid_host = bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host)
    else:
        host, _, port = text.rpartition(":")
        valid_host = bool(_HOST.match(host))
    if not valid_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(form + ".")
    return host, int(port)


def _probe(host: str, port: int, address: str, option: str, timeout_s: float) -> None:
    """A Ray server (GCS or Ray Client, both gRPC) answers at host:port within `timeout_s`."""
    where = f"{option} {address}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(_H2_PREFACE)
            reply = conn.recv(9)
    except socket.gaierror as err:
        raise InputError(
            f"{where}: cannot resolve host {host!r} ({err.strerror}). Check the name, or give the IP."
        ) from None
    except ConnectionRefusedError:
        raise InputError(
            f"{where}: nothing listens at {host}:{port} (connection refused). Is the cluster up? {_START[0].upper() + _START[1:]}."
        ) from None
    except TimeoutError:
        raise InputError(
            f"{where}: no answer from {host}:{port} within {timeout_s:g} s (a firewall, a host that is down, or a "
            f"port where no Ray GCS runs). Check the address the head printed; --ray-timeout sets the wait."
        ) from None
    except OSError as err:
        raise InputError(
            f"{where}: cannot connect to {host}:{port} ({err.strerror or err}). {_START[0].upper() + _START[1:]}."
        ) from None
    if reply.startswith((b"HTTP/", b"<")):  # a status line, or (HTTP/0.9 errors) the page alone
        raise InputError(
            f"{where}: an HTTP server answers at {host}:{port} (the dashboard?), not Ray's GCS. Give the GCS "
            f"address `ray start --head` printed ({host}:6379 by default)."
        )
    if len(reply) < 9 or reply[3] != 0x04:  # not an HTTP/2 SETTINGS frame: not a gRPC server
        raise InputError(
            f"{where}: something listens at {host}:{port}, but it is not a Ray GCS (it does not speak gRPC). Give "
            f"the address `ray start --head` printed (port 6379 by default)."
        )


def connect(
    address: str | None,
    option: str = "--ray-address",
    timeout_s: float = CONNECT_TIMEOUT_S,
    quiet: bool = False,
    **local,
) -> bool:
    """Ray initialised for `address` (checked first), or, without one, a Ray of this machine on 127.0.0.1
    (`local`: more ray.init arguments for it). `quiet`: the workers' and Ray's own actors' output stays in
    the cluster's logs instead of being copied into this command's. Returns whether Ray was started here
    (to shut down after)."""
    import ray

    if ray.is_initialized():
        return False
    import logging

    hush = {"log_to_driver": False, "logging_level": logging.WARNING} if quiet else {}
    if not address:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **hush, **local)
        return True
    ray.init(address=checked_address(address, option, timeout_s), **hush)
    return False


def fits(need: dict[str, float]) -> int:
    """How many bundles of `need` ({"CPU": 1, "GPU": 1}) the cluster's live nodes can hold at once."""
    import ray

    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        total += min(int(have.get(kind, 0) // amount) for kind, amount in need.items() if amount > 0)
    return total


SCALE_WAIT_S = 600.0  # a cloud node takes minutes to start
SCALE_GRACE_S = 6.0  # how long an autoscaler has to show a launch after the request


def timeout_field():
    """The `ray_timeout` option of every config that reaches a cluster (shard stages, training)."""
    from latentmill.schema import opt

    return opt(
        30.0,
        "Ray: seconds to wait for the cluster to answer before giving up with exit 2.",
        low=1.0,
        since="0.3",
    )


def scale_wait_field():
    """The `ray_scale_wait` option of every config that places work on a cluster (shard stages, training)."""
    from latentmill.schema import opt

    return opt(
        SCALE_WAIT_S,
        "Ray: on a cluster that autoscales, seconds to wait for nodes to start when the work does not fit yet "
        "(a cluster that launches none is refused at once).",
        low=0.0,
        since="0.3",
    )


def check_fits(
    count: int,
    need: dict[str, float],
    what: str,
    fix: str,
    wait_s: float = SCALE_WAIT_S,
    log=None,
    status=None,
) -> None:
    """Refuse work that could never be placed: `count` bundles of `need` against what the nodes report. A
    cluster that autoscales is asked for the bundles and waited for (at most `wait_s`, a progress line
    every poll) while it launches nodes; a cluster that launches nothing within a few seconds is refused
    at once. `status()` -> (bundles that fit now, nodes launching, what the cluster has, in words): Ray's
    own by default."""
    import time

    status = status or (lambda: (fits(need), _launching(), _holdings()))
    room, launching, have = status()
    if count <= room:
        return
    _request(count, need)
    try:
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            if room >= count:
                return
            if (not launching and waited >= SCALE_GRACE_S) or waited >= wait_s:
                break
            if launching and log:
                log(f"{what}: waiting for the cluster to scale ({room} of {count} fit, {launching} node(s) "
                    f"starting, {waited:.0f} of {wait_s:.0f} s)")  # fmt: skip
            time.sleep(min(2.0, max(0.1, wait_s - waited)))
            room, launching, have = status()
    finally:
        _request(0, need)
    scaled = f" The cluster was still scaling after {wait_s:.0f} s (--ray-scale-wait)." if launching else ""
    raise InputError(
        f"{what}: {count} x {need} do not fit the cluster, which has {have}: at most {room} fit.{scaled} {fix}"
    )


def _holdings() -> str:
    import ray

    have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return f"{have} on {sum(1 for n in ray.nodes() if n.get('Alive'))} node(s)"


def stderr_line(text: str) -> None:
    """A progress line on stderr (the waits above), apart from the command's output."""
    import sys

    print(text, file=sys.stderr, flush=True)


def _request(count: int, need: dict[str, float]) -> None:
    """Ask the cluster's autoscaler (if it has one) for `count` bundles of `need`; 0 withdraws the ask."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in need.items() if v > 0}] * count)
    except Exception:  # no autoscaler API here: a static cluster, nothing to ask
        pass


def _launching() -> int:
    """Nodes the autoscaler is launching or starting now (0 on a cluster without one)."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    except Exception:  # no autoscaler status: nothing is launching
        return 0
    return sum(getattr(r, "count", 1) for r in status.pending_launches) + len(status.pending_nodes)
