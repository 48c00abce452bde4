"""Shared fixtures: a loopback image server, sample URL tables, and a CLI runner with real exit codes."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from latentmill.cli import cli
from latentmill.curate.imageserver import ImageServer, prerender, sample_rows

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def server():
    """One image server on 127.0.0.1 for the session, its sample images rendered up front."""
    with ImageServer(slow_s=4) as srv:
        prerender(row["URL"] for row in sample_rows(srv.url("")))
        yield srv


@pytest.fixture
def fresh_server():
    """A server of the test's own, for tests that count requests or hold responses."""
    with ImageServer(slow_s=4) as srv:
        yield srv


@pytest.fixture
def sample_table(server, tmp_path):
    """A LAION-like parquet of the server's sample URLs (good images and every failure route)."""
    rows = sample_rows(server.url(""))
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def write_table(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


class Cli:
    """Invoke `latentmill` in-process; returns click's Result (exit_code, output)."""

    def __call__(self, *args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def run_cli():
    return Cli()
