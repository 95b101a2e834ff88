"""Random access to one object in storage through a block cache, and a pyvips source on it.

Why: a pyramidal tiled TIFF in S3 is read a few tiles at a time (a patch bank, one inference
window), so downloading the whole slide for each read wastes time and bandwidth, while reading
through pyvips' custom source with one ranged GET per libtiff request costs far too many
requests (docs/dependencies.md#slides-and-images: 169 GETs for one 512 px region without a
cache: libtiff reads the header, each IFD entry and each tile separately, often a few bytes at
a time).

:class:`BlockCachedFile` splits the object into fixed-size blocks and keeps the most recently
used ones in an LRU cache; a read fetches the blocks it misses, with ONE ranged GET per run of
adjacent missing blocks (coalescing: a tile across a block edge, a tile larger than a block
or a large read costs one GET, not one per block). libtiff reads one tile per call, so a
region costs about one GET per block of tile data it touches (tiles of a row lie next to each
other in the file), and the many small header and IFD reads hit the cache.
Threads share the cache; a block already being fetched by one thread is waited for by the
others rather than fetched twice.

:func:`vips_source` wraps a :class:`BlockCachedFile` as a ``pyvips.SourceCustom``. Each source
has its own read position (libvips seeks and reads), so open one source per image (per TIFF
page); all the sources of one slide can share one :class:`BlockCachedFile` and its cache.

Failures. Every ranged GET is retried on transient failures (connection reset, 5xx,
throttling, endpoint briefly down) with :func:`storage.with_retries`' jittered backoff, under
the S3 connect/request timeouts of :func:`storage.configure` (1 s / 5 s by default), so a dead
endpoint fails in seconds and a silent one in ``attempts * request_timeout_s``; then:

- :class:`storage.StorageNotFound` when the object vanished after it was opened,
- :class:`storage.StorageUnavailable` when the endpoint stopped answering,
- :class:`storage.StoragePermissionError`, or :class:`storage.StorageError` for anything else
  (for instance an object that changed size since it was opened),

each naming the URI, the byte range (inclusive, as in HTTP ``Range: bytes=A-B``) and, on S3,
the endpoint. libvips cannot carry a Python exception through its read callback: the source
records it (:attr:`RangeSource.error`) and returns a read error to libvips;
:meth:`RangeSource.errors` turns the ``pyvips.Error`` that follows back into that storage
error, and any other ``pyvips.Error`` (a truncated or corrupt file: the bytes arrived, they are
not a readable image) into a ``ValueError`` naming the URI. Decision: storage trouble stays a
``StorageError`` (retryable, the object is fine), bad content is a ``ValueError`` (bad input:
retrying will not help).

Measured against moto (a 4096 x 4096 TIFF, 256 px JPEG tiles of about 40 kB, a fresh reader
after opening page 0): a 512 px region costs 1.4 GETs on average (at most 2) tile-aligned and
2.1 (at most 3) unaligned with the default 1 MiB blocks; 2.2 / 4.1 with 256 KiB blocks; 3.2 /
6.8 with 64 KiB blocks; ``tests/integration/test_rangeio.py`` checks the bound "tiles touched
+ 2" against the server's own request log. fsspec's ``BlockCache`` over the same pyarrow
ranged reads was as fast on one thread (its cache hit costs 1.6 us against 2.4 us here, noise
next to decoding a tile), but fetches each block with its own request and shares nothing in
flight: 4 threads reading 8 regions each through one file cost 25 GETs with it and 11 here
(1 MiB blocks), 162 against 119 with 64 KiB blocks, so this cache is kept.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from foveation.io import storage

if TYPE_CHECKING:
    import pyvips

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["BlockCachedFile", "RangeStats", "vips_source"]  # and RangeSource, made lazily


# ------------------------------------------------------------------------------------ stats


@dataclass
class RangeStats:
    """Counters of one :class:`BlockCachedFile`, updated under a lock (readers are threads).

    ``gets`` counts every ranged GET sent (retries included: each is a request the store
    bills); ``hits`` and ``misses`` count blocks: a miss is a block this file fetched, a hit
    one found in the cache or already on its way (fetched by another thread)."""

    gets: int = 0
    """Ranged GET requests issued (one per run of adjacent missing blocks, plus retries)."""
    bytes_fetched: int = 0
    """Bytes received from storage."""
    bytes_served: int = 0
    """Bytes returned to callers of :meth:`BlockCachedFile.read_at`."""
    hits: int = 0
    """Blocks served from the cache (or from another thread's fetch in flight)."""
    misses: int = 0
    """Blocks fetched from storage."""
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def add(
        self,
        *,
        gets: int = 0,
        bytes_fetched: int = 0,
        bytes_served: int = 0,
        hits: int = 0,
        misses: int = 0,
    ) -> None:
        """Add to several counters at once, atomically (spelled out: this is on the path of
        every read, where a loop over ``**kwargs`` costs more than the cache lookup)."""
        with self._lock:
            self.gets += gets
            self.bytes_fetched += bytes_fetched
            self.bytes_served += bytes_served
            self.hits += hits
            self.misses += misses

    def snapshot(self) -> RangeStats:
        """A consistent copy, to compare before and after some reads."""
        with self._lock:
            return RangeStats(**self._values())

    def __sub__(self, other: RangeStats) -> RangeStats:
        """The counts between two snapshots: ``after - before``."""
        mine, theirs = self.snapshot()._values(), other.snapshot()._values()
        return RangeStats(**{name: mine[name] - theirs[name] for name in mine})

    def _values(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


# ------------------------------------------------------------------------------ the reader


class _Fetch:
    """One ranged GET in flight, covering blocks ``first..last``: other threads that need
    those blocks wait for it instead of fetching them again."""

    __slots__ = ("blocks", "done", "error", "first", "last")

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.done = threading.Event()
        self.blocks: dict[int, bytes] = {}
        self.error: BaseException | None = None


class BlockCachedFile:
    """Random-access reads of one object (``s3://`` URI, ``file://`` URI or local path)
    through an LRU cache of fixed-size blocks.

    The object's size is read once at open (one HEAD on S3). A :meth:`read_at` fetches the
    blocks it misses with one ranged GET per run of adjacent missing blocks. Local files go
    through the same cache (``os.pread`` instead of GETs): the page cache makes it redundant
    there, but one code path means the cache logic is tested without S3 and the stats mean
    the same everywhere.

    Thread-safe: one lock guards the cache and the table of fetches in flight; the fetches
    themselves run outside it, so threads reading different blocks do not wait for each
    other. The object is assumed not to change while it is open (a slide is written once):
    a change of size is detected and raised, a same-size rewrite is not.
    """

    def __init__(
        self,
        uri: str,
        block_size: int = 1 << 20,
        max_blocks: int = 64,
        retry: storage.RetryPolicy | None = None,
    ) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError(
                f"BlockCachedFile({uri!r}): block_size={block_size}, max_blocks={max_blocks}; "
                "expected both >= 1"
            )
        self.uri = uri
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.stats = RangeStats()
        # storage's private locator is reused on purpose: it owns endpoint and credential
        # resolution, and its non-streaming filesystem does not retry inside pyarrow, so
        # with_retries below is the one retry layer (attempts, not attempts**2, tries).
        self._loc = storage._locate(uri)
        self.remote = self._loc.remote
        self.retry = (retry or storage.configure().retry) if self.remote else _NO_RETRY
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._pending: dict[int, _Fetch] = {}
        self._closed = False
        self._handle: Any = None
        self._fd: int | None = None
        if self.remote:
            self._handle = self._call(lambda: self._loc.fs.open_input_file(self._loc.path), None)
            self.size = int(self._handle.size())
        else:
            self._fd = self._call(lambda: os.open(self._loc.path, os.O_RDONLY), None)
            self.size = os.fstat(self._fd).st_size

    # -- public API ----------------------------------------------------------------------

    def read_at(self, offset: int, n: int) -> bytes:
        """At most ``n`` bytes from ``offset``: exactly ``n`` unless the object ends first
        (``b""`` at or past the end)."""
        if offset < 0 or n < 0:
            raise ValueError(f"{self.uri!r}: read_at({offset}, {n}); expected offset, n >= 0")
        if self._closed:
            raise ValueError(f"{self.uri!r}: read from a closed BlockCachedFile")
        end = min(offset + n, self.size)
        if end <= offset:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if first == last:  # the common case, a cache hit inside one block: one lock, no dicts
            with self._lock:
                block = self._cache.get(first)
                if block is not None:
                    self._cache.move_to_end(first)
            if block is not None:
                data = block[offset - first * bs : end - first * bs]
                self.stats.add(hits=1, bytes_served=len(data))
                return data
        blocks = self._blocks(first, last)
        if first == last:
            data = blocks[first][offset - first * bs : end - first * bs]
        else:
            parts = [memoryview(blocks[first])[offset - first * bs :]]
            parts += [blocks[b] for b in range(first + 1, last)]
            parts.append(memoryview(blocks[last])[: end - last * bs])
            data = b"".join(parts)
        self.stats.add(bytes_served=len(data))
        return data

    def close(self) -> None:
        """Release the handle and the cache; later reads raise ``ValueError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache.clear()
        if self._handle is not None:
            self._handle.close()
        if self._fd is not None:
            os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def cached_blocks(self) -> list[int]:
        """Block numbers now in the cache, least recently used first (for tests, debugging)."""
        with self._lock:
            return list(self._cache)

    def __enter__(self) -> BlockCachedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its arguments (for Ray tasks): the copy reopens the object (one HEAD)
        and starts with an empty cache; handles and locks do not cross processes."""
        return (type(self), (self.uri, self.block_size, self.max_blocks, self.retry))

    def __repr__(self) -> str:
        return (
            f"BlockCachedFile({self.uri!r}, size={self.size}, block_size={self.block_size}, "
            f"max_blocks={self.max_blocks})"
        )

    # -- the cache -----------------------------------------------------------------------

    def _blocks(self, first: int, last: int) -> dict[int, bytes]:
        """Blocks ``first..last``: from the cache, from fetches in flight, else fetched now
        with one GET per run of adjacent missing blocks."""
        got: dict[int, bytes] = {}
        mine: list[_Fetch] = []
        theirs: list[_Fetch] = []
        with self._lock:
            run_start: int | None = None
            for b in range(first, last + 2):  # last + 1 closes a run that reaches ``last``
                missing = False
                if b <= last:
                    data = self._cache.get(b)
                    if data is not None:
                        self._cache.move_to_end(b)
                        got[b] = data
                    elif (pending := self._pending.get(b)) is not None:
                        if not theirs or theirs[-1] is not pending:
                            theirs.append(pending)
                    else:
                        missing = True
                if missing and run_start is None:
                    run_start = b
                elif not missing and run_start is not None:
                    fetch = _Fetch(run_start, b - 1)
                    for k in range(run_start, b):
                        self._pending[k] = fetch
                    mine.append(fetch)
                    run_start = None
        wanted = last - first + 1
        fetched = sum(f.last - f.first + 1 for f in mine)
        self.stats.add(hits=wanted - fetched, misses=fetched)
        for i, fetch in enumerate(mine):
            try:
                self._fetch(fetch)
            except BaseException as exc:
                # Threads waiting on the fetches not started must not wait forever.
                for rest in mine[i + 1 :]:
                    self._finish(rest, exc)
                raise
            got.update(fetch.blocks)
        for fetch in theirs:
            fetch.done.wait()
            if fetch.error is not None:
                _reraise(fetch.error)
            got.update((b, d) for b, d in fetch.blocks.items() if first <= b <= last)
        return got

    def _fetch(self, fetch: _Fetch) -> None:
        """Fetch the blocks of ``fetch`` with one ranged read, cache them, wake waiters."""
        bs = self.block_size
        start, stop = fetch.first * bs, min(self.size, (fetch.last + 1) * bs)
        try:
            data = self._read_range(start, stop - start)
        except BaseException as exc:
            self._finish(fetch, exc)
            raise
        fetch.blocks = {b: data[(b - fetch.first) * bs : (b - fetch.first + 1) * bs]
                        for b in range(fetch.first, fetch.last + 1)}  # fmt: skip
        with self._lock:
            if not self._closed:
                for b, block in fetch.blocks.items():
                    self._cache[b] = block
                    self._cache.move_to_end(b)
                while len(self._cache) > self.max_blocks:
                    self._cache.popitem(last=False)
        self._finish(fetch, None)

    def _finish(self, fetch: _Fetch, error: BaseException | None) -> None:
        fetch.error = error
        with self._lock:
            for b in range(fetch.first, fetch.last + 1):
                if self._pending.get(b) is fetch:
                    del self._pending[b]
        fetch.done.set()

    # -- storage -------------------------------------------------------------------------

    def _read_range(self, start: int, length: int) -> bytes:
        """Bytes ``start .. start + length - 1`` in one request (retried when transient)."""

        def get() -> bytes:
            self.stats.add(gets=1)
            if self._handle is not None:
                data = self._handle.read_at(length, start)
            else:
                assert self._fd is not None
                data = os.pread(self._fd, length, start)
            self.stats.add(bytes_fetched=len(data))
            return data

        data = self._call(get, (start, start + length - 1))
        if len(data) != length:
            raise storage.StorageError(
                f"{self.uri!r}: bytes {start}-{start + length - 1} gave {len(data)} bytes, "
                f"expected {length}: the object changed since it was opened with "
                f"{self.size} bytes{self._at}; expected it to stay unchanged while read"
            )
        return data

    @property
    def _at(self) -> str:
        return f" at {self._loc.endpoint}" if self.remote else ""

    def _call(self, fn: Callable[[], T], byte_range: tuple[int, int] | None) -> T:
        """``fn()`` with retries; storage failures become :class:`storage.StorageError`s that
        name the URI, the byte range (None: opening) and the endpoint."""
        try:
            return storage.with_retries(fn, self.retry, what=self._what(byte_range))
        except storage.StorageError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise self._error(exc, byte_range) from exc

    def _what(self, byte_range: tuple[int, int] | None) -> str:
        if byte_range is None:
            return f"open {self.uri}"
        return f"read bytes {byte_range[0]}-{byte_range[1]} of {self.uri}"

    def _error(self, exc: BaseException, byte_range: tuple[int, int] | None) -> Exception:
        kind = storage.classify_error(exc)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = repr(self.uri)
        if byte_range is not None:
            where += f" (bytes {byte_range[0]}-{byte_range[1]})"
        if kind is storage.ErrorKind.NOT_FOUND:
            if byte_range is None:
                return storage.StorageNotFound(
                    f"{where} does not exist{self._at} ({detail}); expected an existing object"
                )
            return storage.StorageNotFound(
                f"{where}: the object no longer exists{self._at} ({detail}); "
                "expected it to stay while a reader has it open (deleted after it was opened?)"
            )
        if kind is storage.ErrorKind.DENIED:
            return storage.StoragePermissionError(
                f"{where}: access denied{self._at} ({detail}); expected credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws) allowed to read it"
            )
        if kind is storage.ErrorKind.TRANSIENT and self.remote:
            return storage.StorageUnavailable(
                f"{where}: {self._loc.endpoint} did not answer or kept failing "
                f"({self.retry.attempts} attempts) ({detail}); expected a reachable S3 endpoint"
            )
        action = "open" if byte_range is None else "read"
        return storage.StorageError(f"{where}: could not {action} it ({detail})")


_NO_RETRY = storage.RetryPolicy(attempts=1)
"""Local reads: an error of the local disk is not transient."""


def _reraise(error: BaseException) -> None:
    """Raise another thread's fetch error in this thread: a fresh exception of the same type
    (one exception object raised in two threads would share and grow one traceback)."""
    if isinstance(error, storage.StorageError):
        raise type(error)(str(error)) from error
    raise error


# ------------------------------------------------------------------------------ pyvips


def vips_source(f: BlockCachedFile) -> pyvips.SourceCustom:
    """A ``pyvips.SourceCustom`` reading ``f``, with its own position (open one per image).

    ``pyvips.Image.new_from_source(vips_source(f), "", page=k)`` opens page ``k`` of a TIFF in
    S3. The source is a :class:`RangeSource`: wrap opening and pixel reads in
    ``with source.errors():`` (or open with ``source.open(page=k)``) to get storage failures
    back as :class:`storage.StorageError` rather than as a bare ``pyvips.Error``."""
    return _range_source_class()(f)


def __getattr__(name: str) -> Any:
    """``rangeio.RangeSource``, made on first use: it subclasses ``pyvips.SourceCustom``, and
    importing pyvips loads libvips, which importing this module must not do."""
    if name == "RangeSource":
        return _range_source_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def _range_source_class() -> type[pyvips.SourceCustom]:
    import pyvips

    class RangeSource(pyvips.SourceCustom):
        """A ``pyvips.SourceCustom`` over a :class:`BlockCachedFile`.

        libvips asks for up to ``len(buf)`` bytes at the current position; the read callback
        returns at most that many (docs/dependencies.md#slides-and-images: more corrupts
        libvips' buffer) and 0 at the
        end. Seeks support ``whence`` 0, 1 and 2 like ``io.IOBase.seek``. A storage failure
        in the read callback is kept in :attr:`error` and reported to libvips as a read error
        (-1): returning 0 would look like the end of the file, which libvips may decode as
        black tiles."""

        def __init__(self, f: BlockCachedFile) -> None:
            super().__init__()
            self.file = f
            self.position = 0
            self.error: BaseException | None = None
            # The raw signals rather than on_read(): on_read's wrapper can only return a
            # length, never the -1 that tells libvips the read failed.
            self.signal_connect("read", self._read)
            self.signal_connect("seek", self._seek)

        def _read(self, buf: Any) -> int:
            try:
                data = self.file.read_at(self.position, len(buf))
            except Exception as exc:
                self.error = exc
                log.debug("read callback of %s failed: %s", self.file.uri, exc)
                return -1
            n = len(data)
            buf[:n] = data
            self.position += n
            return n

        def _seek(self, offset: int, whence: int) -> int:
            if whence == os.SEEK_SET:
                position = offset
            elif whence == os.SEEK_CUR:
                position = self.position + offset
            elif whence == os.SEEK_END:
                position = self.file.size + offset
            else:
                return -1
            if position < 0:
                return -1
            self.position = position
            return position

        @contextmanager
        def errors(self, what: str = "read") -> Iterator[None]:
            """Turn a ``pyvips.Error`` raised inside the block into what caused it: the
            storage error the read callback recorded (a :class:`storage.StorageError`), else
            a ``ValueError`` naming the URI (the bytes arrived but are not a readable image:
            a truncated or corrupt file, or a bad request such as a region outside it)."""
            self.error = None
            try:
                yield
            except pyvips.Error as exc:
                cause, self.error = self.error, None
                if isinstance(cause, storage.StorageError):
                    raise type(cause)(str(cause)) from exc
                if cause is not None:
                    raise cause from exc
                detail = " ".join(str(exc).split())[:300] or "pyvips error"
                raise ValueError(
                    f"{self.file.uri!r}: could not {what} it as an image ({detail}); expected "
                    "a complete, readable image file (a truncated or corrupt TIFF?)"
                ) from exc

        def open(self, page: int = 0, **options: Any) -> pyvips.Image:
            """``pyvips.Image.new_from_source(self, "", page=page, **options)``, with errors
            as :meth:`errors` says (a missing or unreadable page: ``ValueError``)."""
            with self.errors("open"):
                return pyvips.Image.new_from_source(self, "", page=page, **options)

    return RangeSource
