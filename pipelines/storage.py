"""URIs (path, ``file://``, ``s3://bucket/prefix``) -> the filesystems Ray Data and Ray Train take.

The resolution itself lives in :mod:`diffae_core.storage` (one implementation, shared with bundles);
this module adds only what Ray needs: a ``(storage_path, storage_filesystem)`` pair for
``RunConfig``, recursive listing for image folders, and URI joining. The S3 endpoint comes from
``--s3-endpoint`` or the standard AWS variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``);
resolve it once on the driver and pass it to workers explicitly, because a Ray worker's environment
is the one its node started with, not the driver's.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

import pyarrow.fs as pafs

from diffae_core.storage import (  # re-exported: callers use one module for URIs
    exists,
    is_remote,
    join,
    read_bytes,
    resolve,
    s3_endpoint,
    write_bytes,
)

__all__ = [
    "exists", "is_remote", "join", "read_bytes", "resolve", "s3_endpoint", "write_bytes",
    "filesystem", "ray_storage", "uri_join", "list_files", "is_dir", "absolute",
]


def filesystem(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for ``ray.data.read_*(path, filesystem=fs)`` and writers.

    For S3 the path is ``bucket/key`` (no scheme), which is what Ray expects when a filesystem is given.
    """
    return resolve(uri, endpoint)


def ray_storage(uri: str, endpoint: str | None = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    Local storage is returned as an absolute path with no filesystem (Ray's default); S3 as
    ``bucket/prefix`` plus a pyarrow S3 filesystem that carries the endpoint override.
    """
    fs, path = resolve(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        return path, None
    return path, fs


def absolute(uri: str | None) -> str | None:
    """A local relative path made absolute against the driver's working directory; anything else unchanged.

    Ray workers and Ray Data tasks run with their own working directory, so a relative output path such
    as ``runs`` or ``outputs/demo`` would land somewhere else in each of them. Built-in source names
    (``shapes:N``) and URIs with a scheme pass through.
    """
    if uri is None or "://" in str(uri) or str(uri).split(":")[0] in ("shapes", "fashion-mnist", "digits"):
        return uri
    return os.path.abspath(str(uri))


def uri_join(uri: str, *parts: str) -> str:
    """``uri`` with path components appended, keeping its scheme (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    """True for a directory (on S3: a prefix with at least one object under it)."""
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(fs: pafs.FileSystem, root: str, extensions: Sequence[str]) -> list[str]:
    """Every file under ``root`` (recursively) whose lower-cased name ends with one of ``extensions``,
    sorted so that the listing (and hence ids and shard order) is the same on every run.

    Hidden files and folders (a component starting with ``.``) are left out: they are editor and OS
    droppings (``.DS_Store``, ``._x.jpg``), not data.
    """
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=False))
    exts = tuple(e.lower() for e in extensions)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(exts):
            continue
        rel = posixpath.relpath(info.path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(info.path)
    return sorted(out)
