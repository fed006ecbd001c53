"""The one storage layer: URIs (a path, ``file://`` or ``s3://bucket/prefix``) -> bytes, JSON and listings.

Every job, the bundle format and the server read and write through these functions, which all take a
URI and an optional S3 endpoint. S3 credentials and region come from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``); the endpoint from the ``endpoint`` argument (e.g. ``http://127.0.0.1:9000`` for
MinIO or moto), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. A Ray worker's environment is the one
its node started with, not the driver's: resolve the endpoint once on the driver (:func:`s3_endpoint`)
and pass it on explicitly.

:func:`filesystem` hands out the underlying pyarrow filesystem for the readers that take one
(Ray Data, Ray Train's ``RunConfig``, parquet).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a")


def is_remote(uri: str | Path) -> bool:
    return urlparse(str(uri)).scheme in S3_SCHEMES


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint override in force: the argument, else the standard AWS variables (or None)."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str, key: str | None, secret: str | None, token: str | None
        ) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the endpoint override and the AWS variables in force (cached per setting)."""
    env = os.environ
    return _s3(s3_endpoint(endpoint), env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
               env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN"))


def filesystem(uri: str | Path, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, ``file://`` URI or ``s3://bucket/key`` URI.

    For S3 the path is ``bucket/key`` (no scheme), which is what Ray and pyarrow expect with a filesystem.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in S3_SCHEMES:
        if not parsed.netloc:
            raise ValueError(f"S3 URI without a bucket: {uri!r} (write s3://bucket/prefix)")
        return s3_filesystem(endpoint), f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), str(Path(parsed.path).resolve())
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter = a Windows drive, not a scheme
        raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}; use a path, file:// or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str | Path, *parts: str) -> str:
    """``uri`` with path components appended, keeping its scheme (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    return "/".join([str(uri).rstrip("/"), *(str(p).strip("/") for p in parts)])


def absolute(uri: str | Path) -> str:
    """A relative local path made absolute against this process's working directory; URIs unchanged.

    Ray workers and tasks run in their own working directory, so a relative output path such as ``runs``
    would land somewhere else in each of them: make paths absolute on the driver.
    """
    uri = str(uri)
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def exists(uri: str | Path, endpoint: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str | Path, endpoint: str | None = None) -> bool:
    """True for a directory (on S3: a prefix with at least one object under it)."""
    fs, path = filesystem(uri, endpoint)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str | Path, endpoint: str | None = None) -> bytes:
    """The whole file at ``uri``; FileNotFoundError naming it when there is none."""
    fs, path = filesystem(uri, endpoint)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError:  # pyarrow says "not found" differently per filesystem
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise


def write_bytes(uri: str | Path, data: bytes, endpoint: str | None = None) -> None:
    """Write a whole file. Local writes go through a temporary name and an atomic rename; an S3 object
    appears only when its upload completes. Either way a reader never sees half a file."""
    fs, path = filesystem(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def json_safe(value: Any) -> Any:
    """Dataclasses, tensors, arrays, tuples and non-finite floats -> plain JSON values (NaN/inf -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist") and callable(value.tolist):  # tensors, numpy arrays and scalars
        return json_safe(value.tolist())
    return value


def read_json(uri: str | Path, endpoint: str | None = None) -> Any:
    return json.loads(read_bytes(uri, endpoint))


def write_json(uri: str | Path, obj: Any, endpoint: str | None = None) -> None:
    write_bytes(uri, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode(), endpoint)


def list_files(uri: str | Path, extensions: Sequence[str], endpoint: str | None = None) -> list[str]:
    """URIs of every file under ``uri``, recursively, whose lower-cased name ends with one of ``extensions``
    (local: absolute paths; S3: ``s3://`` URIs); sorted, so ids and shard order repeat across runs.

    Hidden files and folders (a component starting with ``.``) are left out: they are editor and OS
    droppings (``.DS_Store``, ``._x.jpg``), not data.
    """
    fs, root = filesystem(uri, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=False))
    exts = tuple(e.lower() for e in extensions)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(exts):
            continue
        if any(part.startswith(".") for part in posixpath.relpath(info.path, root).split("/")):
            continue
        out.append(f"s3://{info.path}" if is_remote(uri) else info.path)
    return sorted(out)


def list_dirs(uri: str | Path, endpoint: str | None = None) -> list[str]:
    """Names of the directories directly under ``uri``, sorted; FileNotFoundError when ``uri`` is absent."""
    fs, root = filesystem(uri, endpoint)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
