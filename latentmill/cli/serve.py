"""`latentmill serve-images`."""

from __future__ import annotations

import click


@click.command("serve-images")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port on 127.0.0.1 (0: any free one).",
)
@click.option(
    "--write-table", type=click.Path(), help="Also write a LAION-like URL table of the served images here."
)
@click.option(
    "--slow-seconds", default=30.0, show_default=True, help="How long /fail/slow.jpg takes to answer."
)
def serve_images(port, write_table, slow_seconds):
    """Serve test images and failure cases on 127.0.0.1 until Ctrl-C.

    Useful to try `download` offline (add --allow-host 127.0.0.1:PORT: the server is on loopback).

    \b
    Example:
      latentmill serve-images --port 8765 --write-table sample.parquet
      latentmill download sample.parquet -o images/ --allow-host 127.0.0.1:8765
    """
    import threading

    from latentmill.curate.imageserver import ImageServer, sample_rows

    with ImageServer(port=port, slow_s=slow_seconds) as server:
        if write_table:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(sample_rows(server.url(""))), write_table)
            click.echo(f"wrote {write_table}")
        click.echo(f"serving on {server.url('/')} (Ctrl-C to stop)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            click.echo("stopped")
