"""The options every remote location is opened with, and the bounds on every S3 call.

`set_options()` takes the `--storage-option KEY=VALUE` flags and a recipe's `storage_options:` (fsspec's
storage options: endpoint_url, anon, key, client_kwargs, …), checked here: a value of the wrong type for a
key fsspec's S3 filesystem knows is refused naming the key, before any store is opened. `bounded_options()`
puts botocore's timeouts and retries under them."""

from __future__ import annotations

import copy
import json

from latentmill.errors import InputError

_options: dict = {}


def set_options(options: dict) -> None:
    """Options every remote location is opened with (fsspec's storage_options: endpoint_url, anon, …)."""
    _options.clear()
    _options.update(options)


def options() -> dict:
    return dict(_options)


# the options of fsspec's S3 filesystem (s3fs) that have one type: a value of another is refused by name
_NUMBER = (int, float)
TYPES = {
    "endpoint_url": (str, "a URL (http://10.0.0.5:9000)"),
    "key": (str, "text"),
    "secret": (str, "text"),
    "token": (str, "text"),
    "profile": (str, "text"),
    "anon": (bool, "true or false"),
    "use_ssl": (bool, "true or false"),
    "requester_pays": (bool, "true or false"),
    "version_aware": (bool, "true or false"),
    "use_listings_cache": (bool, "true or false"),
    "default_block_size": (int, "a whole number of bytes"),
    "max_concurrency": (int, "a whole number"),
    "client_kwargs": (dict, 'a mapping ({"region_name": "eu-west-1"})'),
    "config_kwargs": (dict, 'a mapping ({"read_timeout": 60})'),
    "s3_additional_kwargs": (dict, "a mapping"),
}
CLIENT_NUMBERS = ("connect_timeout", "read_timeout")


def check_options(options: dict, source: str) -> dict:
    """`options` with each key fsspec's S3 filesystem knows of its type, and botocore's timeouts positive
    numbers; else an InputError naming `source` and the key."""
    for key, value in options.items():
        kind, what = TYPES.get(key, (object, ""))
        wrong_bool = isinstance(value, bool) and kind is not bool
        if not isinstance(value, kind) or wrong_bool:
            raise InputError(
                f"{source}: storage option {key} = {json.dumps(value, default=str)}: use {what}."
            )
    client = options.get("config_kwargs") or {}
    for key in CLIENT_NUMBERS:
        value = client.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER) or not value > 0):
            raise InputError(
                f"{source}: storage option config_kwargs.{key} = {json.dumps(value)}: use a number of seconds > 0."
            )
    retries = client.get("retries")
    if retries is not None and not isinstance(retries, dict):
        raise InputError(
            f"{source}: storage option config_kwargs.retries = {json.dumps(retries)}: use a mapping "
            f'({{"max_attempts": 3, "mode": "standard"}}).'
        )
    return options


def parse_option(text: str) -> tuple[str, object]:
    """`KEY=VALUE` as given to --storage-option: VALUE read as JSON when it is (true, 3, {"a": 1}), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(
            f"--storage-option {text!r}: expected KEY=VALUE, e.g. endpoint_url=http://10.0.0.5:9000."
        )
    key = key.strip()
    if TYPES.get(key, (None,))[0] is str:
        return key, value  # text as typed (a secret of digits stays text)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# Every S3 call is bounded: botocore's connect and read timeouts and its standard retry mode (exponential
# backoff with jitter), and s3fs's own retry loop around it cut to two tries, so a store that stops
# answering ends a command in about two minutes (2 tries x 3 attempts x (5 + 15) s) instead of never. Any of
# these is overridden with --storage-option config_kwargs='{"read_timeout": 60}' or a recipe's storage_options.
S3_CLIENT = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 3, "mode": "standard"}}
S3FS_TRIES = 2
UPLOAD_MIN_RATE = 256 * 1024  # bytes/s


def store_timeout() -> float:
    """Seconds a store that never answers takes to fail one call, with the options in force."""
    client = client_config(_options)
    attempts = (client.get("retries") or {}).get("max_attempts", 3)
    return S3FS_TRIES * attempts * (client.get("connect_timeout", 60) + client.get("read_timeout", 60))


def client_config(options: dict) -> dict:
    """botocore's Config fields: the bounds above under the user's `config_kwargs` (copies: botocore
    rewrites its retries mapping in place)."""
    return copy.deepcopy(S3_CLIENT) | copy.deepcopy(dict(options.get("config_kwargs") or {}))


def bounded_options(protocol: str, options: dict) -> dict:
    """The storage options with the bounds above under the user's own (theirs win, key by key)."""
    if protocol not in ("s3", "s3a"):
        return options
    import s3fs

    s3fs.S3FileSystem.retries = S3FS_TRIES  # s3fs reads it per call; its default (5) multiplies the bound
    client = client_config(options)
    # no listings cache: another writer (img2dataset's
    # processes, a second encode) changes a prefix between two listings, and a cached one would miss it
    return {"use_listings_cache": False} | options | {"config_kwargs": client}


# fsspec storage options a tool reads only from the environment (img2dataset) -> the variable
_ENVIRONMENT = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
}


def storage_environment() -> dict[str, str]:
    """The storage options as the standard variables, for tools that open URLs with defaults."""
    return {var: str(_options[key]) for key, var in _ENVIRONMENT.items() if key in _options}


def bounded_fsspec_environment() -> dict[str, str]:
    """The S3 bounds for a tool that opens its own fsspec filesystems (img2dataset): fsspec's
    configuration variable, which every S3 filesystem a process (or a process it starts) opens takes as
    its defaults, and fsspec's in-process configuration set the same way for forked children."""
    import fsspec.config

    bounds = {"config_kwargs": client_config(_options), "use_listings_cache": False}
    fsspec.config.conf.setdefault("s3", {}).update(bounds)
    return {"FSSPEC_S3": json.dumps(bounds)}
