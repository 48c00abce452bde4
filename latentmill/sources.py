"""Where a recipe's pictures come from (`urls.source`): a URL table (`--urls` or `urls.path`), a folder of
the user's own images (packed by the download stage instead of downloaded), or the demo's loopback image
server, started once per run and on the same port on every run of a work folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from latentmill.curate.storage import arrow_file, atomic_path, location, write_bytes
from latentmill.errors import InputError
from latentmill.schema import StageConfig, from_section, opt

if TYPE_CHECKING:
    from latentmill.stages import Context


@dataclasses.dataclass
class UrlsSection(StageConfig):
    """Where the URL table comes from."""

    SECTION = "urls"
    RUNTIME = ("path",)
    source: str = opt(
        "file",
        "file: the table given with --urls (or `path`); folder: a folder of your own images (packed, not "
        "downloaded; captions from the pack section or .txt files); sample-server: the demo's own.",
        choices=("file", "folder", "sample-server"),
        cli=False,
    )
    path: str | None = opt(None, "The URL table (or image folder), when --urls is not given.", cli=False)
    photo_views: int = opt(
        1, "sample-server: crops per bundled photograph (12 photographs).", low=1, cli=False
    )
    synthetic: int = opt(24, "sample-server: synthetic pictures.", low=0, cli=False)


def from_folder(recipe: dict) -> bool:
    return (recipe.get("urls") or {}).get("source") == "folder"


def url_source(ctx: Context) -> Path:
    """The URL table or image folder: --urls (or urls.path), or the demo's sample server, started once per run."""
    if ctx.table is not None:
        return ctx.table
    source, lay = from_section(UrlsSection, ctx.recipe.get("urls") or {}), ctx.layout
    if source.source == "sample-server":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from latentmill.curate.imageserver import ImageServer, prerender, sample_rows

        # the same port on every run of this work folder: a resumed download must find the same URLs
        port = int(lay.server_port.read_text()) if lay.server_port.exists() else 0
        try:
            server = ctx.stack.enter_context(ImageServer(port=port, slow_s=10))
        except OSError as err:
            raise InputError(
                f"the demo's image server cannot listen on 127.0.0.1:{port} again ({err}); free the "
                f"port, or start over in a new work folder."
            ) from None
        write_bytes(lay.server_port, str(server.port).encode())
        if not lay.sample_table.exists():
            rows = sample_rows(server.url(""), n_synthetic=source.synthetic, photo_views=source.photo_views)
            with atomic_path(lay.sample_table) as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
        prerender(pq.read_table(arrow_file(lay.sample_table), columns=["URL"]).column("URL").to_pylist())
        ctx.log(f"[urls] sample URLs served on {server.url('/')}")
        # the demo's own loopback server, and only it, is an exception to the private-address guard
        ctx.allowed["allow_hosts"] = [f"127.0.0.1:{server.port}"]
        ctx.table = lay.sample_table
        return lay.sample_table
    path = ctx.urls or source.path
    if not path:
        what = (
            "a folder of images: give --urls FOLDER"
            if source.source == "folder"
            else "a URL table: give --urls FILE"
        )
        raise InputError(f"this recipe reads {what} (or set urls.path).")
    ctx.table = location(path)
    return ctx.table
