"""`latentmill cache`: what latentmill holds in its local scratch folder, and freeing it."""

from __future__ import annotations

import click


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@click.command()
@click.option(
    "--list", "list_", is_flag=True, help="Show each folder: kind, size, who holds it (the default)."
)
@click.option("--clear", is_flag=True, help="Remove every folder no running latentmill process holds.")
def cache(list_, clear):
    """Local copies latentmill keeps in $TMPDIR/latentmill-UID: remote runs' working copies (reused by the
    next run on the same URL), training shard caches, temporaries. Folders of running processes are shown
    as held and never removed.

    \b
    Example:
      latentmill cache --list
      latentmill cache --clear
    """
    from latentmill.curate import scratch

    if list_ and clear:
        raise click.UsageError("give --list or --clear, not both.")
    if clear:
        removed, freed, kept = scratch.clear()
        click.echo(f"removed {removed} folder(s), {_size(freed)} freed from {scratch.root()}")
        for entry in kept:
            click.echo(f"kept (in use by PID {entry['pid']} on {entry['host']}): {entry['path']}")
        return
    entries = scratch.folders()
    if not entries:
        click.echo(f"{scratch.root()}: nothing held")
        return
    for entry in entries:
        holder = f"in use by PID {entry['pid']} on {entry['host']}" if entry["held"] else "not in use"
        if entry["held"] and entry["pid"] is None:
            holder = "being made"
        click.echo(
            f"{entry['kind']:<6} {_size(entry['bytes']):>9}  {holder:<32} {entry['path']}  {entry['what'] or ''}"
        )
    total = sum(e["bytes"] for e in entries)
    click.echo(f"{len(entries)} folder(s), {_size(total)} in {scratch.root()}")
