"""The connect-time private-address guard: after name resolution, on every redirect hop, in img2dataset's
worker processes; live traffic to loopback servers only, names resolved by an injected resolver."""

import socket

import pytest

from latentmill.curate import netguard
from latentmill.curate.download import DownloadConfig, download
from latentmill.curate.imageserver import ImageServer
from latentmill.errors import InputError
from tests.conftest import write_table

pytestmark = pytest.mark.slow  # end to end: real downloads, Ray, training runs

RESOLVER = "tests.netguard_resolver:resolve"


@pytest.fixture
def guarded():
    yield netguard
    netguard.uninstall()


def test_names_are_checked_after_resolution_and_the_allow_list_is_exact(guarded):
    guarded.install(["good.example:8080", "127.0.0.1:9999"], RESOLVER)
    assert socket.create_connection is guarded.guarded_create_connection
    for host, port in (
        ("evil.example", 80),
        ("rebind.example", 443),
        ("good.example", 8081),
        ("127.0.0.1", 9998),
        ("localhost", 9999),
    ):  # the allow-list names hosts as URLs spell them
        with pytest.raises(
            guarded.PrivateAddressRefused, match=f"private_address: {host}:{port} resolves to"
        ):
            guarded.check_connection(host, port)
    assert guarded.check_connection("good.example", 8080)[0][4][0] == "127.0.0.1"
    assert guarded.check_connection("127.0.0.1", 9999)
    assert guarded.check_connection("public.example", 80)[0][4][0] == "93.184.216.34"
    with pytest.raises(InputError, match="HOST:PORT"):
        guarded.parse_allow_hosts(["127.0.0.1"])


def test_redirects_and_names_to_private_addresses_are_refused_in_the_download_workers(fresh_server, tmp_path):
    with ImageServer(slow_s=1) as other:  # another loopback port: not allowed
        port = fresh_server.port
        rows = [
            {"URL": fresh_server.url("/gen/1/300x300.jpg"), "TEXT": "allowed server"},
            {
                "URL": fresh_server.url("/redirect?to=" + fresh_server.url("/gen/2/300x300.jpg")),
                "TEXT": "redirect, same server",
            },
            {
                "URL": fresh_server.url("/redirect?to=" + other.url("/gen/3/300x300.jpg")),
                "TEXT": "redirect, other port",
            },
            {
                "URL": f"http://evil.example:{port}/gen/4/300x300.jpg",
                "TEXT": "a name that resolves to loopback",
            },
        ]
        table = write_table(tmp_path / "urls.parquet", rows)
        summary = download(
            table,
            tmp_path / "images",
            DownloadConfig(
                processes=1,
                http_threads=4,
                timeout=5,
                retries=0,
                shard_size=16,
                min_image_size=64,
                allow_hosts=(f"127.0.0.1:{port}",),
                resolver=RESOLVER,
            ),
        )
        assert other.requests == []  # the redirect to it was refused before connecting
    assert summary["success"] == 2
    assert summary["failures"] == {"private_address": 2}, summary["failures"]
    assert not any(
        "/gen/4/" in path for path in fresh_server.requests
    )  # the name was refused before connecting
