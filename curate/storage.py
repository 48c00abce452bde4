"""Where data lives: a local path, or an fsspec URL (s3://bucket/prefix, gs://…, memory:// in tests).

Every stage names its folders and files through `location()`: a `pathlib.Path` for a local path, a
`upath.UPath` (the same path API over fsspec) for a URL, so `/`, `.name`, `.glob()`, `.exists()`,
`.open()` read the same either way. Writes go through `atomic_path()`: on disk a temporary name and a
rename, as always; in an object store the file is made locally and uploaded whole (one object appears
complete or not at all), and a stage's completion marker (a shard's stats file) is written after its
data, so a killed writer never leaves a marker without its data. `write_bytes`/`write_json` leave an
identical file alone, so a finished stage run again writes nothing (no PUT).

Credentials and endpoints come from the standard places (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the instance role); `set_options()` (the `--storage-option KEY=VALUE`
flags, the recipe's `storage_options:`) passes anything else to fsspec.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from latentmill.curate.storageoptions import (  # noqa: F401 (the storage API, re-exported)
    S3_CLIENT,
    S3FS_TRIES,
    UPLOAD_MIN_RATE,
    _options,
    bounded_fsspec_environment,
    bounded_options,
    client_config,
    options,
    parse_option,
    set_options,
    storage_environment,
    store_timeout,
)
from latentmill.errors import InputError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# protocol -> (the package that implements it, the latentmill extra that installs it)
EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
}


def protocol_of(spec) -> str | None:
    """The URL scheme of `spec` ("s3"), or None for a local path."""
    if isinstance(spec, Path):
        return None
    if hasattr(spec, "protocol") and hasattr(spec, "fs"):  # a UPath
        return spec.protocol or None
    match = _URL.match(str(spec))
    return match.group(1).lower() if match else None


def is_remote(spec) -> bool:
    return protocol_of(spec) not in (None, "file", "local")


def location(spec: str | os.PathLike):
    """A local path as `Path`, a URL as a `UPath` with the storage options; a missing fsspec backend is a
    clear error naming the extra that installs it."""
    if isinstance(spec, Path) or (hasattr(spec, "protocol") and hasattr(spec, "fs")):
        return spec
    text = os.fspath(spec)
    protocol = protocol_of(text)
    if protocol in (None, "file", "local"):
        return Path(text.split("://", 1)[1] if protocol else text)
    _require(protocol, text)
    check_url(text)
    from upath import UPath

    return UPath(text, **bounded_options(protocol, _options))


def is_async(fs) -> bool:
    """An fsspec filesystem whose calls run on its event loop (s3fs, gcsfs): they take `timeout=`."""
    from fsspec.asyn import AsyncFileSystem

    return isinstance(fs, AsyncFileSystem)


def check_url(text: str) -> str:
    """`text` with its path segments checked: `.`, `..` and empty segments (`s3://b/runs/..`, `s3://b//x`)
    are refused, as object stores do not resolve them and a local copy named from them would not stay in
    its folder. One trailing slash is allowed (a prefix)."""
    rest = text.split("://", 1)[1]
    segments = rest.rstrip("/").split("/") if rest.rstrip("/") else []
    bad = [s for s in segments if s in ("", ".", "..")]
    if bad or not segments:
        what = "an empty segment (//)" if (bad and bad[0] == "") or not segments else f"a {bad[0]!r} segment"
        raise InputError(
            f"{text}: {what} in a store URL. Give the URL spelled out (s3://BUCKET/PREFIX/NAME), without "
            f"'.', '..' or '//'."
        )
    return text


def _require(protocol: str, spec: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package, extra = EXTRAS.get(protocol, (f"the fsspec backend for {protocol}://", None))
        fix = f"pip install 'latentmill[{extra}]'" if extra else f"install {package}"
        raise InputError(
            f"{spec}: {protocol}:// needs {package}, which is not installed. Fix: {fix}."
        ) from None
    except ValueError:
        raise InputError(
            f"{spec}: unknown storage protocol {protocol}://. Use a local path, s3://, gs:// or another "
            f"fsspec protocol."
        ) from None


def make_folder(path) -> None:
    """A folder to write into: created on disk; in an object store folders are prefixes and need nothing
    (creating one must never create a bucket by accident)."""
    if not is_remote(path):
        if Path(path).is_file():
            raise InputError(
                f"{path}: a file, where a folder is written; give a folder (a new one, or one this command made)."
            )
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            raise InputError(f"{path}: a file stands where a folder on this path must go.") from None


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a local temporary path to write `path`'s content into. On success: on disk, renamed onto
    `path`; in an object store, uploaded as one object. On failure nothing appears."""
    path = location(path)
    if is_remote(path):
        from latentmill.curate.scratch import temporary_folder

        with temporary_folder(f"upload of {path}") as folder:
            tmp = folder / path.name
            yield tmp
            upload(tmp, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temporary_name(path: Path) -> Path:
    """Where a file or folder is made before it is renamed onto `path`: `.NAME.tmp-HOST-PID`, so that
    the next run can tell a dead writer's leftovers (`remove_stale_temporaries`) from a live one's."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", os.uname().nodename)[:40] or "host"
_TEMPORARY = re.compile(r"^\..+\.tmp-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)$")


def remove_stale_temporaries(folder, recursive: bool = True) -> int:
    """Remove the temporaries (`.NAME.tmp-[HOST-]PID`, files or folders) that writers killed mid-write left
    under `folder` on disk: those of this host whose process is gone. A live writer's, and another host's
    (a shared file system), are left alone. Returns how many were removed."""
    folder = location(folder)
    if is_remote(folder) or not folder.is_dir():
        return 0  # a store never shows a half-written object
    removed = 0
    for path in folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*"):
        found = _TEMPORARY.match(path.name)
        if not found or found["host"] not in (None, _HOST) or _alive(int(found["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def upload(local: Path, path) -> None:
    """Put a local file at `path` (a UPath) whole: S3 shows an object only once its upload completed."""
    # botocore sends a file with `Expect: 100-continue`, and that wait has no timeout of its own: the whole
    # upload is bounded instead (the store's bound, plus the time at a slow 256 KB/s)
    bound = store_timeout() + local.stat().st_size / UPLOAD_MIN_RATE
    path.fs.put_file(str(local), path.path, **({"timeout": bound} if is_async(path.fs) else {}))


def read_bytes_if_exists(path) -> bytes | None:
    try:
        return location(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_bytes(path, data: bytes) -> bool:
    """Write `data` atomically unless `path` already holds exactly it; True when it wrote."""
    if read_bytes_if_exists(path) == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def write_json(path, data) -> bool:
    """Write `data` as indented JSON, atomically, unless the file already holds exactly it."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n"
    return write_bytes(path, text.encode())


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path) or is_remote(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@contextmanager
def local_file(path) -> Iterator[Path]:
    """A local file with `path`'s content, for readers that need one (random access, memory maps): the
    path itself on disk, a temporary download of the object otherwise."""
    path = location(path)
    if not is_remote(path):
        yield path
        return
    from latentmill.curate.scratch import temporary_folder

    with temporary_folder(f"copy of {path}") as folder:
        tmp = folder / path.name
        path.fs.get_file(path.path, str(tmp))
        yield tmp


def arrow_file(path):
    """What pyarrow's readers take for `path`: the path on disk, or an open file of the object."""
    path = location(path)
    return path.open("rb") if is_remote(path) else str(path)


def move(source, target) -> None:
    """Move a file or folder (in an object store: copied, then deleted)."""
    source, target = location(source), location(target)
    if is_remote(source):
        source.fs.mv(source.path, target.path, recursive=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def publish_folder(local: Path, target, last: tuple[str, ...] = ("lineage.json",)) -> None:
    """Make the folder `target` hold exactly the files of the local folder `local`: each file written
    whole (identical ones left alone), the names in `last` after the others, then files no longer there
    removed."""
    target = location(target)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name in sorted(names, key=lambda n: n in last):
        write_bytes(target / name, (local / name).read_bytes())
    if is_remote(target):
        base = target.path.rstrip("/") + "/"
        target.fs.invalidate_cache()
        present = [f[len(base) :] for f in target.fs.find(target.path) if f.startswith(base)]
        for name in sorted(set(present) - set(names)):
            remove(target / name)


def read_parquet(path, columns: list[str] | None = None):
    """A parquet file (on disk or in a store) as a pyarrow Table; a damaged one is an InputError naming it."""
    import pyarrow.parquet as pq

    return _parquet(path, lambda source: pq.read_table(source, columns=columns))


def parquet_schema(path):
    import pyarrow.parquet as pq

    return _parquet(path, pq.read_schema)


def _parquet(path, read):
    import pyarrow as pa

    path = location(path)
    try:
        if not is_remote(path):
            return read(path)
        with path.open("rb") as f:
            return read(f)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        if isinstance(err, FileNotFoundError | PermissionError) or explain(err):
            raise  # a missing file, or a store's refusal: the callers and the CLI say those
        raise InputError(
            f"{path}: cannot be read as parquet ({str(err).splitlines()[0][:160]}): cut off or damaged. "
            f"Run the stage that wrote it again (its shard is redone when its stats file is removed)."
        ) from None


def load_npy(path, mmap: bool = False):
    """A .npy array: memory-mapped on disk when asked, read whole from a store."""
    import io

    import numpy as np

    path = location(path)
    if not is_remote(path):
        return np.load(path, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(path.read_bytes()))


def file_version(path) -> tuple[int, str]:
    """(size, version) of a file, to cache what was computed from its content: the mtime on disk, the
    ETag (or last-modified time) in an object store."""
    if not is_remote(path):
        stat = Path(path).stat()
        return stat.st_size, str(stat.st_mtime_ns)
    info = path.fs.info(path.path)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("created") or ""
    return int(info.get("size") or 0), str(version)


def remove(path) -> None:
    """Delete a file or a folder with everything under it (no error when absent)."""
    path = location(path)
    if is_remote(path):
        try:
            path.fs.rm(path.path, recursive=True)
        except FileNotFoundError:
            pass
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def explain(err: BaseException) -> str | None:
    """A storage failure as the one line a user needs (what failed, the fix), or None when `err` is not one."""
    name = type(err).__name__
    text = str(err)
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain or len(chain) > 8:
            break
        chain.append(nxt)
    names = {type(e).__name__ for e in chain}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or _options.get("endpoint_url") or "the default endpoint"
    if names & {"ReadTimeoutError", "FSTimeoutError", "TimeoutError", "ServerTimeoutError"}:
        timeout = client_config(_options)["read_timeout"]
        return (
            f"the object store at {endpoint} stopped answering (no reply within {timeout} s, retried with "
            f"backoff). Check that the server is up and not overloaded, then run the command again: it "
            f"resumes. A slow store: --storage-option config_kwargs='{{\"read_timeout\": 120}}'."
        )
    if names & {
        "EndpointConnectionError",
        "ClientConnectorError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
    }:
        return (
            f"cannot reach the object store at {endpoint} ({text.splitlines()[0][:160] if text else name}). "
            f"Check AWS_ENDPOINT_URL or --storage-option endpoint_url=…, and that the server is up."
        )
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return (
            "no credentials for the object store. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), or run where an instance role provides them."
        )
    if isinstance(err, PermissionError) or names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return (
            f"the object store refused access ({text.splitlines()[0][:200] if text else name}). Check "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they may read and write there."
        )
    if isinstance(err, FileNotFoundError) and "bucket does not exist" in text.lower():
        return f"{text}: the bucket of the URL does not exist. Create it, or fix the URL's bucket name."
    return None
