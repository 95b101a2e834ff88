"""One filesystem API over plain paths, ``file://`` and ``s3://`` URIs (DESIGN.md, "Storage").

Every part of the platform resolves URIs here to ``(pyarrow.fs.FileSystem, path)``. Writes are
atomic: a temporary name then a rename on local disk; a single completed PUT on S3.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs


class StorageError(OSError):
    pass


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a plain path, ``file://`` URI or ``s3://bucket/key``."""
    if not is_remote(uri):
        path = uri.removeprefix("file://")
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        bucket_key = uri.removeprefix("s3://")
        return pafs.S3FileSystem(**kwargs), bucket_key
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise StorageError(
            f"{uri!r}: unsupported storage URI ({exc}); expected a path, file:// or s3://"
        ) from None


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri!r} does not exist") from None


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old file or the whole new one, never a part."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with fs.open_output_stream(path) as f:  # one PUT / completed multipart upload
        f.write(data)


@contextmanager
def local_staging_dir(uri: str) -> Iterator[str]:
    """A local directory whose contents appear at ``uri`` all at once when the block exits
    without error (a rename on local disk; an upload of every file on S3). Used for
    checkpoints, so a crash never leaves a half-written one."""
    import shutil
    import tempfile

    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        parent = os.path.dirname(path.rstrip("/"))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        try:
            yield tmp
            if os.path.exists(path):
                old = f"{tmp}.old"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, tmp).replace(os.sep, "/")
                with open(local, "rb") as f:
                    write_bytes(posixpath.join(uri.rstrip("/"), rel), f.read())
