"""``foveation.io.rangeio`` against a real S3 endpoint (moto's server on 127.0.0.1): a pyramidal
tiled TIFF in a bucket opened by pyvips through ranged GETs, the number of GETs a region
costs (counted by the reader and, independently, in the server's request log), the cache,
and the failures: a truncated TIFF, a key deleted after open, an endpoint that stops."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from foveation.io import storage
from foveation.io.rangeio import BlockCachedFile, vips_source
from foveation.io.storage import RetryPolicy

TILE = 256
REGION = 512


@pytest.fixture(autouse=True)
def _restore_storage_options() -> Iterator[None]:
    previous = storage.configure()
    yield
    storage.configure(previous)


@pytest.fixture(scope="module")
def slide_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4096 x 4096 RGB pyramidal tiled TIFF, 256 px JPEG tiles at Q 90 (about 14 MB, 5
    pages), with texture at several scales so that tiles have realistic sizes (about 40 kB)."""
    import pyvips

    noise = pyvips.Image.gaussnoise(4096, 4096, sigma=40, mean=128)
    image = noise.gaussblur(1.5).bandjoin(
        [noise.rot90().gaussblur(3), noise.flip("horizontal").gaussblur(1)]
    )
    path = tmp_path_factory.mktemp("rangeio") / "slide.tif"
    image.cast("uchar").tiffsave(
        str(path),
        tile=True,
        pyramid=True,
        tile_width=TILE,
        tile_height=TILE,
        compression="jpeg",
        Q=90,
    )
    return path


@pytest.fixture
def slide_uri(slide_tif: Path, s3_bucket: str) -> str:
    uri = f"{s3_bucket}/slides/slide.tif"
    storage.upload_file(slide_tif, uri)
    return uri


class RequestLog(logging.Handler):
    """The GETs the moto server answered, from its werkzeug request log: an independent
    count of the HTTP requests, not the reader's own counter."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def gets(self, uri: str) -> int:
        needle = f"GET /{uri.removeprefix('s3://')} "
        return sum(needle in line for line in self.lines)


@pytest.fixture
def request_log() -> Iterator[RequestLog]:
    logger = logging.getLogger("werkzeug")
    handler, level = RequestLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _tiles_touched(left: int, top: int, width: int, height: int) -> int:
    cols = (left + width - 1) // TILE - left // TILE + 1
    rows = (top + height - 1) // TILE - top // TILE + 1
    return cols * rows


def _local_region(path: Path, left: int, top: int, page: int = 0) -> np.ndarray:
    import pyvips

    image = pyvips.Image.new_from_file(str(path), page=page)
    return image.crop(left, top, REGION, REGION).numpy()


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("block_size", [1 << 20, 64 << 10], ids=["1MiB", "64KiB"])
def test_region_costs_few_gets_and_equals_the_local_read(
    slide_tif: Path, slide_uri: str, request_log: RequestLog, block_size: int
) -> None:
    f = BlockCachedFile(slide_uri, block_size=block_size)
    src = vips_source(f)
    image = src.open(page=0)
    assert (image.width, image.get("tile-width"), image.get("n-pages")) == (4096, TILE, 5)
    assert request_log.gets(slide_uri) == f.stats.gets  # opening: header and IFDs

    for left, top in [(1024, 1536), (1100, 2150)]:  # tile-aligned (2 x 2), unaligned (3 x 3)
        before, served_before = f.stats.snapshot(), request_log.gets(slide_uri)
        with src.errors():
            region = image.crop(left, top, REGION, REGION).numpy()
        np.testing.assert_array_equal(region, _local_region(slide_tif, left, top))
        delta = f.stats - before
        assert 1 <= delta.gets <= _tiles_touched(left, top, REGION, REGION) + 2, delta
        assert request_log.gets(slide_uri) - served_before == delta.gets  # the server agrees

        # The same region through a new source (a new image) on the same file: all hits.
        before = f.stats.snapshot()
        again = vips_source(f).open(page=0).crop(left, top, REGION, REGION).numpy()
        np.testing.assert_array_equal(again, region)
        delta = f.stats - before
        assert delta.gets == 0 and delta.misses == 0 and delta.hits > 0

    # A lower pyramid level through its own source, sharing the cache.
    level2 = vips_source(f).open(page=2)
    np.testing.assert_array_equal(
        level2.crop(300, 200, REGION, REGION).numpy(), _local_region(slide_tif, 300, 200, 2)
    )
    assert request_log.gets(slide_uri) == f.stats.gets
    f.close()


def test_a_small_region_never_downloads_the_slide(slide_tif: Path, slide_uri: str) -> None:
    f = BlockCachedFile(slide_uri, block_size=256 << 10)
    assert f.size == slide_tif.stat().st_size > 10_000_000
    src = vips_source(f)
    with src.errors():
        region = src.open(page=0).crop(2048, 2048, REGION, REGION).numpy()
    np.testing.assert_array_equal(region, _local_region(slide_tif, 2048, 2048))
    assert f.stats.bytes_fetched < f.size / 4, (f.stats, f.size)


def test_threads_share_one_reader(slide_tif: Path, slide_uri: str) -> None:
    """A source per thread (each has one read position), one file and cache for all."""
    f = BlockCachedFile(slide_uri, block_size=256 << 10)
    spots = [(97 * k % 3500, 61 * k % 3500) for k in range(1, 9)]
    results: dict[tuple[int, int], np.ndarray] = {}

    def worker(left: int, top: int) -> None:
        results[left, top] = vips_source(f).open(page=0).crop(left, top, REGION, REGION).numpy()

    threads = [threading.Thread(target=worker, args=spot) for spot in spots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for left, top in spots:
        np.testing.assert_array_equal(results[left, top], _local_region(slide_tif, left, top))


# ---------------------------------------------------------------------------- failures


def test_truncated_tiff_is_a_value_error_naming_the_uri(slide_tif: Path, s3_bucket: str) -> None:
    """Decision: bad content is a ValueError naming the URI (retrying will not help), storage
    trouble a StorageError. Cut at half, the TIFF's first IFD (written after the full
    resolution tiles) is gone: nothing opens. Cut at 90 %, page 0 is whole but page 1 is not."""
    whole = slide_tif.read_bytes()
    half = f"{s3_bucket}/slides/half.tif"
    storage.write_bytes(half, whole[: len(whole) // 2])
    f = BlockCachedFile(half)
    with pytest.raises(ValueError, match=f"{half}.*truncated or corrupt"):
        vips_source(f).open(page=0)

    most = f"{s3_bucket}/slides/most.tif"
    storage.write_bytes(most, whole[: len(whole) * 9 // 10])
    f = BlockCachedFile(most)
    page0 = vips_source(f).open(page=0)
    np.testing.assert_array_equal(
        page0.crop(0, 0, REGION, REGION).numpy(), _local_region(slide_tif, 0, 0)
    )
    with pytest.raises(ValueError, match=f"{most}.*could not open it as an image"):
        vips_source(f).open(page=1)


def test_key_deleted_after_open_is_not_found_naming_uri_and_range(
    slide_uri: str, s3_client
) -> None:
    f = BlockCachedFile(slide_uri, block_size=256 << 10)
    src = vips_source(f)
    image = src.open(page=0)
    bucket, key = slide_uri.removeprefix("s3://").split("/", 1)
    s3_client.delete_object(Bucket=bucket, Key=key)

    before = f.stats.snapshot()
    with pytest.raises(storage.StorageNotFound) as err:
        f.read_at(5_000_000, 100)  # block 19: 4980736 .. 5242879, not cached by the open
    message = str(err.value)
    assert slide_uri in message and "bytes 4980736-5242879" in message
    assert "no longer exists" in message
    assert (f.stats - before).gets == 1  # "not found" is never retried

    with pytest.raises(storage.StorageNotFound, match=slide_uri), src.errors():
        image.crop(2048, 2048, REGION, REGION).numpy()


def test_endpoint_stopping_mid_read_is_unavailable_within_seconds(slide_uri: str) -> None:
    """A second server (the same in-process moto state, so it serves the same bucket) is
    stopped after the reader opened the slide: the next region fails in seconds, naming the
    URI, the byte range and the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    storage.configure(endpoint_url=endpoint)
    try:
        f = BlockCachedFile(slide_uri, block_size=256 << 10)
        src = vips_source(f)
        image = src.open(page=0)
        image.crop(0, 0, REGION, REGION).numpy()
    finally:
        server.stop()

    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable) as err:
        f.read_at(5_000_000, 100)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert slide_uri in message and endpoint in message and "bytes 4980736-5242879" in message

    start = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=endpoint), src.errors():
        image.crop(2048, 2048, REGION, REGION).numpy()
    assert time.monotonic() - start < 10


def test_endpoint_down_briefly_is_retried(
    slide_tif: Path, slide_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Transient failures are retried with backoff: the endpoint refuses connections for
    half a second, then a server comes back on the same port and the read succeeds."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    first = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    first.start()
    storage.configure(endpoint_url=f"http://127.0.0.1:{port}")
    try:
        retry = RetryPolicy(attempts=10, base_delay_s=0.1, max_delay_s=0.4)
        f = BlockCachedFile(slide_uri, block_size=256 << 10, retry=retry)
    finally:
        first.stop()
    second = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    starter = threading.Timer(0.5, second.start)
    starter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="foveation.io.storage"):
            region = vips_source(f).open(page=0).crop(1024, 1024, REGION, REGION).numpy()
    finally:
        starter.join()
        second.stop()
    np.testing.assert_array_equal(region, _local_region(slide_tif, 1024, 1024))
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(slide_uri in line and "bytes" in line for line in retries)
