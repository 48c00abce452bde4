"""img2dataset's Downloader with the connect-time guard (`netguard`) installed in each worker process.

A module of its own so that importing `netguard` (the table check needs its allow-list parser) does not
import img2dataset, and so that the workers, which unpickle the downloader, find the class by name.
"""

from __future__ import annotations

from img2dataset.downloader import Downloader

from latentmill.curate import netguard


class GuardedDownloader(Downloader):
    """Downloader whose first call in a process installs the guard with `allow_hosts` and `resolver`."""

    allow_hosts: tuple[str, ...] = ()
    resolver: str | None = None

    def __call__(self, row):
        netguard.install(self.allow_hosts, self.resolver)
        return super().__call__(row)


def guarded_downloader(allow_hosts=(), resolver: str | None = None):
    """A factory to put where img2dataset builds its Downloader."""

    def build(*args, **kwargs):
        downloader = GuardedDownloader(*args, **kwargs)
        downloader.allow_hosts, downloader.resolver = tuple(allow_hosts), resolver
        return downloader

    return build
