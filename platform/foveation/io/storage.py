"""One filesystem API over plain paths, ``file://`` and ``s3://`` URIs (docs/contracts.md#storage).

Every part of the platform goes through this module, so that one local S3 endpoint serves
them all in tests and one set of guarantees holds everywhere:

- **Atomic writes.** On local disk a write goes to a temporary name beside the target and is
  renamed over it. On S3 an object is written by one completed PUT, or by a multipart upload
  that is completed only when every part arrived and aborted otherwise (boto3's managed
  transfer; pyarrow's output stream completes a partial upload when closed after an error).
  Readers see the old object or the whole new one, never a part.
- **Retries.** Whole S3 operations (read, write, list, exists, size, delete, transfers) are
  retried with jittered exponential backoff on transient failures (connection errors, 5xx,
  throttling), never on "not found" or "access denied". Streams handed out by
  :func:`resolve` retries inside pyarrow instead.
- **Clear errors.** Every failure is a :class:`StorageError` that names the URI and what was
  expected: :class:`StorageNotFound` (missing bucket or key), :class:`StoragePermissionError`
  (denied), :class:`StorageUnavailable` (the endpoint does not answer, within seconds).

The S3 endpoint comes from an explicit argument of :func:`resolve`, else :func:`configure`,
else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself; credentials come from
the standard AWS chain (environment variables, ``~/.aws``). ``http://127.0.0.1:PORT``
endpoints work (local S3 servers). Importing this module touches neither network nor disk:
clients are created on first use and cached.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from foveation.errors import FoveationError

log = logging.getLogger(__name__)

T = TypeVar("T")

_COPY_CHUNK = 8 << 20
"""Bytes per read when copying streams: large enough for S3 throughput, small for memory."""


# ----------------------------------------------------------------------------------- errors


class StorageError(FoveationError, OSError):
    """A storage operation failed; the message names the URI and what was expected."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The bucket, object, file or directory does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """The credentials in use may not do this (HTTP 403, missing credentials, bad signature)."""


class StorageUnavailable(StorageError, ConnectionError):
    """The endpoint did not answer, or kept failing transiently, after every retry."""


class ErrorKind(enum.Enum):
    """What a low-level failure means for the caller: decides retrying and the error raised."""

    NOT_FOUND = "not found"
    DENIED = "access denied"
    TRANSIENT = "transient"
    OTHER = "other"


# Error codes as pyarrow prints them ("AWS Error SLOW_DOWN during ...") and as S3 and botocore
# name them ("SlowDown"). Matched as whole tokens: request ids in messages contain digits.
_NOT_FOUND_CODES = frozenset(
    {"NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND"}
    | {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
)
_DENIED_CODES = frozenset(
    {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH"}
    | {"INVALID_CLIENT_TOKEN_ID", "MISSING_AUTHENTICATION_TOKEN", "UNRECOGNIZED_CLIENT"}
    | {"REQUEST_EXPIRED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
    | {"ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem", "403"}
)
_TRANSIENT_CODES = frozenset(
    {"NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE"}
    | {"INTERNAL_FAILURE", "REQUEST_TIMEOUT", "SlowDown", "Throttling", "ThrottlingException"}
    | {"RequestTimeout", "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}
    | {"TooManyRequestsException", "429", "500", "502", "503", "504"}
)
_PYARROW_CODE = re.compile(r"AWS Error (\w+)")


def classify_error(exc: BaseException) -> ErrorKind:
    """Sort a failure from pyarrow, botocore or the OS into an :class:`ErrorKind`.

    pyarrow raises plain ``OSError``s whose message carries the AWS error code, botocore
    raises ``ClientError``s with the code and HTTP status, so both are read here, once."""
    if isinstance(exc, FileNotFoundError):
        return ErrorKind.NOT_FOUND
    if isinstance(exc, PermissionError):
        return ErrorKind.DENIED
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return ErrorKind.TRANSIENT
    botocore_kind = _classify_botocore(exc)
    if botocore_kind is not None:
        return botocore_kind
    message = str(exc)
    match = _PYARROW_CODE.search(message)
    if match:
        return _kind_of_code(match.group(1))
    if "curlCode" in message:
        return ErrorKind.TRANSIENT
    return ErrorKind.OTHER


def _kind_of_code(code: str, status: int | None = None) -> ErrorKind:
    if code in _NOT_FOUND_CODES or status == 404:
        return ErrorKind.NOT_FOUND
    if code in _DENIED_CODES or status == 403:
        return ErrorKind.DENIED
    if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
        return ErrorKind.TRANSIENT
    return ErrorKind.OTHER


def _classify_botocore(exc: BaseException) -> ErrorKind | None:
    """botocore's view, or None for other errors. botocore is only looked at if it was
    imported: an error cannot come from a module nobody loaded."""
    exceptions = sys.modules.get("botocore.exceptions")
    if exceptions is None:
        return None
    if isinstance(exc, exceptions.ClientError):
        response: dict[str, Any] = getattr(exc, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _kind_of_code(code, status)
    if isinstance(exc, (exceptions.NoCredentialsError, exceptions.PartialCredentialsError)):
        return ErrorKind.DENIED
    if isinstance(exc, (exceptions.ConnectionError, exceptions.HTTPClientError)):
        return ErrorKind.TRANSIENT
    return None


def _is_io_failure(exc: BaseException) -> bool:
    """Failures of storage itself, as opposed to bugs (TypeError ...) that must surface as is."""
    module = type(exc).__module__
    return isinstance(exc, (OSError, pa.ArrowException)) or module.startswith(
        ("botocore", "boto3", "s3transfer")
    )


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient failures are retried."""

    attempts: int = 3
    """Tries in all, the first included; 1 turns retries off."""
    base_delay_s: float = 0.1
    """Delay before the first retry; doubled before each further one."""
    max_delay_s: float = 2.0
    """Cap on one delay, so that a long outage fails in seconds rather than minutes."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts={self.attempts}: expected at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(
                f"RetryPolicy delays ({self.base_delay_s}, {self.max_delay_s}): expected >= 0"
            )

    def delay_s(self, retry: int) -> float:
        """Delay before retry number ``retry`` (0-based): half fixed, half random, so that
        many workers failing together do not come back in lockstep."""
        cap = min(self.max_delay_s, self.base_delay_s * 2**retry)
        return cap / 2 + random.uniform(0, cap / 2)


@dataclass(frozen=True)
class S3Options:
    """Process-wide S3 settings (see :func:`configure`)."""

    endpoint_url: str | None = None
    """e.g. ``http://127.0.0.1:9000``; None: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
    then AWS's own endpoint for the region."""
    region: str | None = None
    """None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, then the SDKs' own lookup."""
    connect_timeout_s: float = 1.0
    """TCP connect timeout: an endpoint that does not accept connections fails fast."""
    request_timeout_s: float = 5.0
    """Longest silence on an open connection (not a cap on a whole transfer)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)


_options = S3Options()


def configure(options: S3Options | None = None, **changes: Any) -> S3Options:
    """Set the process-wide S3 options and return the previous ones (to restore them later).

    ``configure(endpoint_url="http://127.0.0.1:9000")`` changes one field;
    ``configure(previous)`` restores; ``configure()`` just returns the current options.
    Call it at start-up: clients made under other options stay cached but are not used."""
    global _options
    previous = _options
    _options = replace(options or previous, **changes)
    return previous


# -------------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class _S3Target:
    """Everything an S3 client is built from; the key of the client caches."""

    endpoint_url: str | None
    region: str | None
    connect_timeout_s: float
    request_timeout_s: float
    internal_attempts: int
    identity: tuple[str | None, str | None]
    """(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``): a change of identity in the environment
    never reuses a client that signs as the previous one."""


@dataclass(frozen=True)
class _Location:
    """A parsed URI: the filesystem and path to act on, and what error messages name."""

    uri: str
    fs: pafs.FileSystem
    path: str
    target: _S3Target | None = None
    """Set for ``s3://``; None on local disk."""

    @property
    def remote(self) -> bool:
        return self.target is not None

    @property
    def bucket(self) -> str:
        return self.path.partition("/")[0]

    @property
    def key(self) -> str:
        return self.path.partition("/")[2]

    @property
    def endpoint(self) -> str:
        if self.target is None:
            return "local disk"
        return self.target.endpoint_url or "the default AWS S3 endpoint"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _endpoint_url(explicit: str | None) -> str | None:
    return (
        explicit
        or _options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _s3_target(endpoint_url: str | None, *, streaming: bool) -> _S3Target:
    """The client settings for one call. ``streaming``: the caller reads through the handle
    itself, out of reach of :func:`with_retries`, so pyarrow must retry inside; for whole
    operations pyarrow tries once and :func:`with_retries` retries (one layer, so a dead
    endpoint fails in ``attempts`` tries rather than ``attempts**2``)."""
    env = os.environ
    return _S3Target(
        endpoint_url=_endpoint_url(endpoint_url),
        region=_options.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        connect_timeout_s=_options.connect_timeout_s,
        request_timeout_s=_options.request_timeout_s,
        internal_attempts=_options.retry.attempts if streaming else 1,
        identity=(env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_PROFILE")),
    )


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """``(scheme, host[:port])`` from ``http://host:port``; a bare ``host:port`` is https."""
    if "://" not in endpoint_url:
        return "https", endpoint_url.rstrip("/")
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageError(
            f"S3 endpoint {endpoint_url!r}: expected http://host:port or https://host[:port]"
        )
    return parts.scheme, parts.netloc


@lru_cache(maxsize=16)
def _s3_filesystem(target: _S3Target) -> pafs.S3FileSystem:
    """One pyarrow S3 filesystem per target: making one is not free (client, TLS, threads)."""
    kwargs: dict[str, Any] = {}
    if target.endpoint_url:
        scheme, host = _split_endpoint(target.endpoint_url)
        kwargs = {"endpoint_override": host, "scheme": scheme}
    return pafs.S3FileSystem(
        region=target.region,
        connect_timeout=target.connect_timeout_s,
        request_timeout=target.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=target.internal_attempts),
        **kwargs,
    )


@lru_cache(maxsize=16)
def _s3_client(target: _S3Target) -> Any:
    """One boto3 S3 client per target, for writes (see the module docstring for why)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=target.connect_timeout_s,
        read_timeout=target.request_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        # Local servers (moto, MinIO) have no per-bucket DNS names.
        s3={"addressing_style": "path"} if target.endpoint_url else None,
    )
    session = boto3.session.Session(region_name=target.region)
    return session.client("s3", endpoint_url=target.endpoint_url, config=config)


@lru_cache(maxsize=1)
def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_COPY_CHUNK, multipart_chunksize=_COPY_CHUNK)


def _locate(uri: str, *, streaming: bool = False, endpoint_url: str | None = None) -> _Location:
    if not is_remote(uri):
        return _Location(uri, pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://")))
    if uri.startswith("s3://"):
        path = uri.removeprefix("s3://")
        if not path.partition("/")[0]:
            raise StorageError(f"{uri!r}: no bucket; expected s3://bucket/key")
        target = _s3_target(endpoint_url, streaming=streaming)
        return _Location(uri, _s3_filesystem(target), path.rstrip("/") or path, target)
    # Other schemes are refused rather than handed to pyarrow: gs:// alone can stall for
    # minutes probing for cloud credentials before failing.
    raise StorageError(f"{uri!r}: unsupported storage URI; expected a path, file:// or s3://")


def resolve(uri: str, *, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a plain path, ``file://`` URI or ``s3://bucket/key``, for
    callers that drive pyarrow themselves (Ray Data, Train storage). The S3 filesystem
    retries transient failures inside pyarrow; ``endpoint_url`` overrides the configured one."""
    loc = _locate(uri, streaming=True, endpoint_url=endpoint_url)
    return loc.fs, loc.path


def absolute(uri: str) -> str:
    """A local path made absolute (relative to this process's directory); URIs unchanged."""
    if is_remote(uri):
        return uri
    if uri.startswith("file://"):
        return uri
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(uri, *parts)


# ---------------------------------------------------------------------- retries and mapping


def with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str = "storage call",
    is_transient: Callable[[BaseException], bool] | None = None,
) -> T:
    """``fn()``, called again after a backoff while it fails transiently (by default as
    :func:`classify_error` says), at most ``policy.attempts`` times in all. Other failures,
    and the last transient one, propagate unchanged."""
    transient = is_transient or (lambda exc: classify_error(exc) is ErrorKind.TRANSIENT)
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == policy.attempts or not transient(exc):
                raise
            delay = policy.delay_s(attempt - 1)
            log.warning(
                "%s failed (%s); retry %d of %d in %.2f s",
                what,
                _first_line(exc),
                attempt,
                policy.attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _run(loc: _Location, action: str, expected: str, fn: Callable[[], T]) -> T:
    """``fn()`` as one storage operation: retried on transient remote failures, and any
    storage failure re-raised as a :class:`StorageError` naming the URI, the action and
    ``expected`` (what the caller needed to find)."""
    policy = _options.retry if loc.remote else RetryPolicy(attempts=1)
    try:
        return with_retries(fn, policy, what=f"{action} {loc.uri}")
    except StorageError:
        raise
    except Exception as exc:
        if not _is_io_failure(exc):
            raise
        raise _storage_error(exc, loc, action, expected, policy.attempts) from exc


_WRITE_ACTIONS = frozenset({"write", "create"})
"""Actions whose "not found" means a missing parent or bucket, not a missing target."""


def _storage_error(
    exc: BaseException, loc: _Location, action: str, expected: str, attempts: int
) -> StorageError:
    kind = classify_error(exc)
    detail = _first_line(exc)
    where = f"{loc.uri!r}"
    if kind is ErrorKind.NOT_FOUND:
        if loc.remote and _bucket_exists(loc) is False:
            return StorageNotFound(
                f"{where}: bucket {loc.bucket!r} does not exist at {loc.endpoint}; "
                "expected an existing bucket (create it first)"
            )
        if action in _WRITE_ACTIONS:
            return StorageNotFound(
                f"{where}: could not {action} it ({detail}); expected {expected}"
            )
        at = f" at {loc.endpoint}" if loc.remote else ""
        return StorageNotFound(f"{where} does not exist{at}; expected {expected}")
    if kind is ErrorKind.DENIED:
        return StoragePermissionError(
            f"{where}: access denied when trying to {action} it at {loc.endpoint} ({detail}); "
            "expected credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws) allowed to "
            f"{action} it"
        )
    if kind is ErrorKind.TRANSIENT and loc.remote:
        return StorageUnavailable(
            f"{where}: {loc.endpoint} did not answer or kept failing ({attempts} attempts) "
            f"when trying to {action} it ({detail}); expected a reachable S3 endpoint "
            "(AWS_ENDPOINT_URL or storage.configure(endpoint_url=...))"
        )
    return StorageError(f"{where}: could not {action} it ({detail}); expected {expected}")


def _bucket_exists(loc: _Location) -> bool | None:
    """Whether the bucket of ``loc`` exists, asked once (no retries) to tell a missing bucket
    from a missing key in the error message; None when the question itself fails."""
    try:
        return _has_bucket(loc)
    except Exception:
        return None


def _has_bucket(loc: _Location) -> bool:
    return loc.fs.get_file_info(loc.bucket).type != pafs.FileType.NotFound


def _require_key(loc: _Location) -> None:
    if loc.remote and not loc.key:
        raise StorageError(f"{loc.uri!r}: no key; expected s3://bucket/key")


# ----------------------------------------------------------------------------------- reading


def exists(uri: str) -> bool:
    """Whether a file, directory or (on S3) object or non-empty prefix is at ``uri``.
    A missing bucket is False; denied access and a dead endpoint raise."""
    loc = _locate(uri)
    return _run(
        loc,
        "check",
        "a reachable location",
        lambda: loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound,
    )


def read_bytes(uri: str) -> bytes:
    """The whole file or object: on S3 the body of one version, even while it is replaced.

    Why one GetObject on S3 and not pyarrow's input stream: that asks the object's size
    first and then reads byte ranges, so an object replaced in between reads as the first
    bytes of the new version, a torn read (seen as truncated JSON when a slide job's state
    was read while its runner wrote the next progress)."""
    loc = _locate(uri)
    if loc.remote:
        _require_key(loc)
        assert loc.target is not None
        client = _s3_client(loc.target)

        def get() -> bytes:
            return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()

        return _run(loc, "read", "an existing file", get)

    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()

    return _run(loc, "read", "an existing file", read)


def size(uri: str) -> int:
    """Size in bytes of the file or object at ``uri``."""
    loc = _locate(uri)
    info = _run(loc, "stat", "an existing file", lambda: _file_info(loc))
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri!r} is a directory; expected a file")
    return int(info.size)


def _file_info(loc: _Location) -> pafs.FileInfo:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc.path} does not exist")
    return info


def list_files(uri: str, suffixes: str | Sequence[str] | None = None) -> list[str]:
    """Every file under ``uri``, recursively, sorted, as URIs in the form ``uri`` was given
    (``join(uri, relative path)``); ``[uri]`` if it is a file. ``suffixes`` keeps names that
    end with one of them, case-insensitively (``.SVS`` is ``.svs``). Hidden entries (a path
    component starting with ``.``) are left out: they include this module's temporary files
    of writes in progress. Nothing at ``uri`` raises :class:`StorageNotFound`."""
    loc = _locate(uri)
    wanted = _normalise_suffixes(suffixes)
    infos = _run(loc, "list", "an existing file or directory", lambda: _list_infos(loc))
    base = loc.path.rstrip("/")
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(wanted):
            continue
        if info.path == loc.path:
            found.append(uri)
            continue
        rel = info.path[len(base) :].lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")):
            found.append(join(uri, rel))
    return sorted(found)


def _normalise_suffixes(suffixes: str | Sequence[str] | None) -> tuple[str, ...]:
    if suffixes is None:
        return ("",)
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    return tuple(s.lower() for s in suffixes)


def _list_infos(loc: _Location) -> list[pafs.FileInfo]:
    info = _file_info(loc)
    if info.type == pafs.FileType.File:
        return [info]
    return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))


def download_file(uri: str, local_path: str | os.PathLike[str]) -> None:
    """Copy ``uri`` to ``local_path``, atomically: the destination is the old file or the
    whole new one, never a part (a failed attempt leaves no temporary file behind)."""
    loc = _locate(uri)
    dest = os.path.abspath(local_path)

    def download() -> None:
        with loc.fs.open_input_stream(loc.path) as src:
            _write_local_atomically(dest, lambda dst: _copy_stream(src, dst))

    _run(loc, "download", "an existing file", download)


def read_chunks(uri: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The file or object at ``uri`` in chunks of at most ``chunk`` bytes, for streaming it
    (an HTTP download) without holding it whole. Opening it fails as ``read_bytes`` does
    (a clear ``StorageError``), before the first chunk."""
    loc = _locate(uri)
    stream = _run(loc, "read", "an existing file", lambda: loc.fs.open_input_stream(loc.path))

    def chunks() -> Iterator[bytes]:
        with stream:
            while data := stream.read(chunk):
                yield data

    return chunks()


def presigned_url(uri: str, expires_s: int) -> str | None:
    """A URL that reads the S3 object at ``uri`` without credentials for ``expires_s``
    seconds (signed with this process's), or None for a local path (nothing to sign)."""
    loc = _locate(uri)
    if not loc.remote:
        return None
    assert loc.target is not None
    client = _s3_client(loc.target)
    return _run(
        loc,
        "sign",
        "an S3 object",
        lambda: client.generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": loc.key}, ExpiresIn=expires_s
        ),
    )


def _copy_stream(src: Any, dst: BinaryIO) -> None:
    while chunk := src.read(_COPY_CHUNK):
        dst.write(chunk)


# ----------------------------------------------------------------------------------- writing


def remove_tree(uri: str) -> None:
    """Delete a file, or a folder (every object under an S3 prefix) and all it holds; nothing
    there is not an error."""
    import pyarrow.fs as pafs

    loc = _locate(uri)

    def remove() -> None:
        kind = loc.fs.get_file_info(loc.path).type
        if kind == pafs.FileType.File:
            loc.fs.delete_file(loc.path)
        elif kind != pafs.FileType.NotFound:
            loc.fs.delete_dir(loc.path)

    _run(loc, "delete", "a deletable folder or prefix", remove)


def makedirs(uri: str) -> None:
    """Make a local directory (and its parents). On S3 prefixes need no making: check that
    the bucket exists, so that a typo fails here and not at the first write."""
    loc = _locate(uri)
    if not loc.remote:
        _run(loc, "create", "a writable location", lambda: os.makedirs(loc.path, exist_ok=True))
    elif not _run(loc, "check", "a bucket", lambda: _has_bucket(loc)):
        raise StorageNotFound(
            f"{uri!r}: bucket {loc.bucket!r} does not exist at {loc.endpoint}; "
            "expected an existing bucket (create it first)"
        )


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old file or the whole new one, never a part."""
    loc = _locate(uri)
    if loc.remote:
        _put_object(loc, lambda: io.BytesIO(data))
        return
    _run(
        loc,
        "write",
        "a writable location",
        lambda: _write_local_atomically(loc.path, lambda f: f.write(data)),
    )


def upload_file(local_path: str | os.PathLike[str], uri: str) -> None:
    """Copy the local file ``local_path`` to ``uri``, atomically (see :func:`write_bytes`)."""
    source = os.fspath(local_path)
    if not os.path.isfile(source):
        raise StorageNotFound(
            f"{source!r}: no such local file; expected a file to upload to {uri!r}"
        )
    loc = _locate(uri)
    if loc.remote:
        _put_object(loc, lambda: open(source, "rb"))  # noqa: SIM115 (closed by _put_object)
        return

    def copy(dst: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)

    _run(loc, "write", "a writable location", lambda: _write_local_atomically(loc.path, copy))


def _put_object(loc: _Location, source: Callable[[], AbstractContextManager[BinaryIO]]) -> None:
    """Upload what ``source()`` opens (fresh for every attempt) as the object at ``loc``: one
    PUT, or a multipart upload that is completed only when every part arrived and aborted
    otherwise, so readers never see a partial object."""
    _require_key(loc)
    assert loc.target is not None
    client = _s3_client(loc.target)

    def put() -> None:
        with source() as body:
            client.upload_fileobj(body, loc.bucket, loc.key, Config=_transfer_config())

    _run(loc, "write", "a writable location", put)


def _temp_beside(path: str) -> str:
    """A fresh hidden temporary name in the directory of ``path`` (made if missing), so that
    the final rename stays on one filesystem and is atomic."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def _write_local_atomically(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``fill(file)`` into a temporary file beside it, fsync, rename."""
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def delete(uri: str, *, missing_ok: bool = False) -> None:
    """Delete the file or object at ``uri``, or everything under the directory or prefix
    ``uri`` (``s3://bucket`` empties the bucket but keeps it)."""
    loc = _locate(uri)

    def remove() -> None:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            loc.fs.delete_file(loc.path)
        elif info.type == pafs.FileType.Directory:
            if loc.remote and not loc.key:
                loc.fs.delete_dir_contents(loc.path)
            else:
                loc.fs.delete_dir(loc.path)
        elif not missing_ok:
            raise FileNotFoundError(f"{loc.path} does not exist")

    _run(loc, "delete", "an existing file or directory", remove)


COMMITTED = "COMMITTED"
"""The pointer file of a staged directory in object storage (see ``local_staging_dir``)."""


@contextmanager
def local_staging_dir(uri: str) -> Iterator[str]:
    """A local directory whose files appear at ``uri`` when the block exits without error,
    and nothing at all when it raises; a directory already at ``uri`` stays whole and
    readable until the new one is complete. Used for checkpoints.

    Local disk: one rename, so the new directory replaces the old at once. S3 has no rename
    and a set of PUTs is not atomic (an upload failing half-way, a full disk or an outage,
    would leave new files beside old ones), so the files go to a fresh version prefix
    ``<uri>/<version>/`` and then one PUT of ``<uri>/COMMITTED`` names it: readers resolve
    the directory with :func:`committed`. The previous version is deleted afterwards (best
    effort: a leftover costs space, never a wrong read)."""
    loc = _locate(uri)
    if not loc.remote:
        with _local_staging(loc.path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        version = f"v{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        for root, dirs, files in os.walk(tmp):
            dirs.sort()
            for name in sorted(files):
                local = os.path.join(root, name)
                rel = os.path.relpath(local, tmp).replace(os.sep, "/")
                upload_file(local, join(uri, version, rel))
        pointer = join(uri, COMMITTED)
        previous = _committed_version(pointer)
        write_bytes(pointer, json.dumps({"version": version}).encode())  # the commit
        if previous and previous != version:
            try:
                delete(join(uri, previous), missing_ok=True)
            except StorageError as exc:
                log.warning("%s: old version %s not deleted (%s)", uri, previous, exc)


def _committed_version(pointer: str) -> str | None:
    if not exists(pointer):
        return None
    try:
        version = json.loads(read_bytes(pointer))["version"]
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{pointer}: not a commit pointer of this platform") from None
    if not isinstance(version, str) or "/" in version or version in ("", ".", ".."):
        raise StorageError(f"{pointer}: names no version ({version!r})")
    return version


def committed(uri: str) -> str:
    """Where the files of a directory written by ``local_staging_dir`` are: ``uri`` itself on
    local disk (and for directories written before versions), its committed version in S3."""
    if not is_remote(uri):
        return uri
    version = _committed_version(join(uri, COMMITTED))
    return join(uri, version) if version else uri


@contextmanager
def _local_staging(path: str) -> Iterator[str]:
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
