"""The slide URI allow-list: a whole-slide job reads only under configured prefixes.

Local paths (plain or ``file://``) are resolved (``..`` collapsed, symlinks followed) before
they are compared, so neither ``runs/data/../../etc/passwd`` nor a symlink out of an allowed
folder gets through; ``s3://`` URIs must have a bucket and key, no ``..`` or ``.`` segments,
and start with an allowed ``s3://`` prefix at a ``/`` boundary. Other schemes are refused."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from foveation.serving.errors import RequestError


def _local(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def normalise_prefix(prefix: str) -> str:
    if prefix.startswith("s3://"):
        return prefix.rstrip("/") + "/"
    return _local(prefix.removeprefix("file://")).rstrip("/") + "/"


def check_slide_uri(uri: object, allowed_prefixes: tuple[str, ...] | list[str]) -> str:
    """The URI to read (local paths resolved), or a :class:`RequestError` (422 malformed,
    403 outside every allowed prefix)."""
    if not isinstance(uri, str) or not uri.strip():
        raise RequestError(422, "missing_slide_uri", "slide_uri: expected a non-empty string")
    if any(ord(c) < 32 for c in uri) or len(uri) > 2048:
        raise RequestError(
            422, "bad_slide_uri", "slide_uri: control characters or longer than 2048"
        )
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme == "s3":
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        parts = key.split("/")
        if not bucket or not key or any(p in ("..", ".", "") for p in parts):
            raise RequestError(
                422,
                "bad_slide_uri",
                f"slide_uri {uri!r}: expected s3://bucket/key without '..', '.' or empty parts",
            )
        resolved = f"s3://{bucket}/{key}"
    elif scheme in ("", "file"):
        path = uri[len("file://") :] if scheme == "file" else uri
        if ".." in path.replace("\\", "/").split("/"):
            raise RequestError(403, "slide_uri_not_allowed", f"slide_uri {uri!r}: '..' refused")
        resolved = _local(path)
    else:
        raise RequestError(
            422, "bad_slide_uri", f"slide_uri {uri!r}: scheme {scheme!r}; expected s3:// or a path"
        )
    for prefix in allowed_prefixes:
        p = normalise_prefix(prefix)
        if (p.startswith("s3://") == resolved.startswith("s3://")) and resolved.startswith(p):
            return resolved
    raise RequestError(
        403,
        "slide_uri_not_allowed",
        f"slide_uri {uri!r} is not under an allowed prefix (serve.jobs.allowed_prefixes)",
    )
