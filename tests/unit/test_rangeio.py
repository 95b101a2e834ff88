"""``foveation.io.rangeio`` on local files (no S3): read correctness against the bytes of the
file, block math and coalescing, LRU eviction, stats, threads, and the pyvips source over a
pyramidal tiled TIFF. The S3 side (GET counts, errors of a real endpoint) is in
``tests/integration/test_rangeio.py``."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from foveation.io import rangeio
from foveation.io.rangeio import BlockCachedFile, RangeStats, vips_source


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    """A local file of 10_000 random bytes: not a multiple of the block sizes used below."""
    data = random.Random(0).randbytes(10_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture(scope="module")
def pyramid_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024 x 768 RGB pyramidal tiled JPEG TIFF written by pyvips (3 pages: 1024, 512, 256 wide)."""
    import pyvips

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (768 // 8, 1024 // 8, 3), dtype=np.uint8)
    im = pyvips.Image.new_from_array(pixels).resize(8, kernel="linear")
    path = tmp_path_factory.mktemp("rangeio") / "slide.tif"
    im.tiffsave(
        str(path),
        tile=True,
        pyramid=True,
        tile_width=256,
        tile_height=256,
        compression="jpeg",
        Q=90,
    )
    return path


# ------------------------------------------------------------------------------- read_at


def test_random_reads_equal_the_file_bytes(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    rng = random.Random(1)
    with BlockCachedFile(str(path), block_size=256, max_blocks=8) as f:
        assert f.size == len(data)
        for _ in range(2000):
            offset = rng.randrange(0, len(data) + 300)  # past the end too
            n = rng.choice([0, 1, 7, 255, 256, 257, 1000, rng.randrange(0, 4000)])
            assert f.read_at(offset, n) == data[offset : offset + n], (offset, n)
        # Edges: the last byte, a read crossing the end, at and past the end.
        assert f.read_at(len(data) - 1, 1) == data[-1:]
        assert f.read_at(len(data) - 10, 100) == data[-10:]
        assert f.read_at(len(data), 5) == b""
        assert f.read_at(len(data) + 10**9, 5) == b""
        assert f.read_at(0, 10**9) == data  # more than the cache holds, in one read


def test_file_uri_and_bad_arguments(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    with BlockCachedFile(f"file://{path}") as f:
        assert f.read_at(100, 50) == data[100:150]
        with pytest.raises(ValueError, match="expected offset, n >= 0"):
            f.read_at(-1, 5)
    with pytest.raises(ValueError, match="closed"):
        f.read_at(0, 1)
    with pytest.raises(ValueError, match="block_size=0"):
        BlockCachedFile(str(path), block_size=0)
    missing = str(path) + ".nope"
    with pytest.raises(rangeio.storage.StorageNotFound, match=missing):
        BlockCachedFile(missing)


def test_block_math_and_coalescing(blob: tuple[Path, bytes]) -> None:
    """A read fetches exactly the blocks it misses, one request per run of adjacent ones;
    the last block is short (the file ends inside it)."""
    path, data = blob
    bs = 1000
    with BlockCachedFile(str(path), block_size=bs, max_blocks=100) as f:
        assert f.read_at(1500, 2000) == data[1500:3500]  # blocks 1..3, all missing: one read
        assert (f.stats.gets, f.stats.bytes_fetched) == (1, 3 * bs)
        assert (f.stats.misses, f.stats.hits) == (3, 0)
        assert f.cached_blocks() == [1, 2, 3]

        before = f.stats.snapshot()
        assert f.read_at(0, 6 * bs) == data[: 6 * bs]  # 0 and 4..5 missing: two runs
        delta = f.stats - before
        assert (delta.gets, delta.bytes_fetched, delta.misses, delta.hits) == (2, 3 * bs, 3, 3)

        before = f.stats.snapshot()
        assert f.read_at(9990, 100) == data[9990:]  # the short last block (9000..9999)
        delta = f.stats - before
        assert (delta.gets, delta.bytes_fetched, delta.bytes_served) == (1, 1000, 10)

        before = f.stats.snapshot()
        assert f.read_at(2999, 2) == data[2999:3001]  # across a block edge, both cached
        assert (f.stats - before).gets == 0


def test_lru_eviction(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    with BlockCachedFile(str(path), block_size=100, max_blocks=3) as f:
        for b in (0, 1, 2):
            f.read_at(b * 100, 1)
        f.read_at(0, 1)  # touch 0: now 1 is the least recently used
        f.read_at(300, 1)  # block 3 evicts block 1
        assert f.cached_blocks() == [2, 0, 3]
        before = f.stats.snapshot()
        assert f.read_at(150, 10) == data[150:160]  # block 1 again: a miss, evicts 2
        assert (f.stats - before).gets == 1
        assert f.cached_blocks() == [0, 3, 1]
        assert f.read_at(0, 1000) == data[:1000]  # a read larger than the cache still works
        assert len(f.cached_blocks()) == 3


def test_stats_count_and_snapshot_is_a_copy(blob: tuple[Path, bytes]) -> None:
    path, _ = blob
    with BlockCachedFile(str(path), block_size=1000) as f:
        f.read_at(0, 10)
        f.read_at(5, 10)
        snap = f.stats.snapshot()
        assert snap == RangeStats(gets=1, bytes_fetched=1000, bytes_served=20, hits=1, misses=1)
        f.read_at(0, 2500)
        assert snap.bytes_served == 20  # the snapshot did not move
        assert f.stats.bytes_served == 2520 and f.stats.gets == 2
        assert (f.stats - snap) == RangeStats(
            gets=1, bytes_fetched=2000, bytes_served=2500, hits=1, misses=2
        )


def test_eight_threads_read_correct_bytes(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    errors: list[BaseException] = []
    with BlockCachedFile(str(path), block_size=128, max_blocks=6) as f:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(1500):
                    offset, n = rng.randrange(0, len(data)), rng.randrange(0, 700)
                    got = f.read_at(offset, n)
                    if got != data[offset : offset + n]:
                        raise AssertionError(f"wrong bytes at {offset}+{n}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(f.cached_blocks()) <= 6
        stats = f.stats.snapshot()
        assert stats.bytes_served > 0 and stats.hits > 0 and stats.misses > 0


def test_threads_wanting_one_block_fetch_it_once(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one thread fetches a block, the others wait for it instead of fetching it too
    (a slow storage is simulated by a delay before the real read)."""
    path, data = blob
    f = BlockCachedFile(str(path), block_size=1000)
    real = f._read_range

    def slow(start: int, length: int) -> bytes:
        time.sleep(0.2)
        return real(start, length)

    monkeypatch.setattr(f, "_read_range", slow)
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def worker() -> None:
        barrier.wait()
        results.append(f.read_at(4100, 50))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [data[4100:4150]] * 8
    assert (f.stats.gets, f.stats.misses, f.stats.hits) == (1, 1, 7)


def test_a_failed_fetch_fails_its_waiters_too(
    blob: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads waiting on a fetch that fails get the error, not a hang, and the block is
    fetched again on the next read."""
    path, data = blob
    f = BlockCachedFile(str(path), block_size=1000)
    real = f._read_range
    failing = threading.Event()
    failing.set()

    def flaky(start: int, length: int) -> bytes:
        time.sleep(0.2)
        if failing.is_set():
            raise rangeio.storage.StorageUnavailable("endpoint down (simulated)")
        return real(start, length)

    monkeypatch.setattr(f, "_read_range", flaky)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def worker() -> None:
        barrier.wait()
        try:
            f.read_at(10, 5)
            outcomes.append("ok")
        except rangeio.storage.StorageUnavailable as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert outcomes == ["endpoint down (simulated)"] * 4
    failing.clear()
    assert f.read_at(10, 5) == data[10:15]


def test_pickles_as_its_arguments(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    f = BlockCachedFile(str(path), block_size=512, max_blocks=4)
    f.read_at(0, 10)
    copy = pickle.loads(pickle.dumps(f))
    assert (copy.uri, copy.block_size, copy.max_blocks) == (f.uri, 512, 4)
    assert copy.cached_blocks() == [] and copy.read_at(600, 20) == data[600:620]


def test_import_loads_no_pyvips() -> None:
    """The module is imported by code that may never read a TIFF: pyvips (libvips) is loaded
    on the first ``vips_source``."""
    code = "import sys, foveation.io.rangeio; assert 'pyvips' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ------------------------------------------------------------------------------ pyvips


def test_vips_source_reads_every_page_like_the_file(pyramid_tif: Path) -> None:
    import pyvips

    f = BlockCachedFile(str(pyramid_tif), block_size=16 << 10, max_blocks=16)
    n_pages = pyvips.Image.new_from_file(str(pyramid_tif)).get("n-pages")
    assert n_pages == 3
    for page in range(n_pages):
        direct = pyvips.Image.new_from_file(str(pyramid_tif), page=page)
        # A new source per page, all sharing one file and its cache.
        image = pyvips.Image.new_from_source(vips_source(f), "", page=page)
        assert (image.width, image.height) == (direct.width, direct.height)
        left, top = image.width // 3, image.height // 5
        w, h = min(300, image.width - left), min(200, image.height - top)
        np.testing.assert_array_equal(
            image.crop(left, top, w, h).numpy(), direct.crop(left, top, w, h).numpy()
        )
    np.testing.assert_array_equal(
        pyvips.Image.new_from_source(vips_source(f), "", page=0).numpy(),
        pyvips.Image.new_from_file(str(pyramid_tif)).numpy(),
    )
    assert f.stats.hits > 0 and f.stats.bytes_fetched <= 2 * f.size


def test_source_read_and_seek_callbacks(blob: tuple[Path, bytes]) -> None:
    """The callbacks libvips calls: reads return at most the bytes asked (0 at the end), and
    every seek origin (``whence`` 0, 1, 2) works; each source keeps its own position."""
    path, data = blob
    f = BlockCachedFile(str(path), block_size=1000)
    src, other = vips_source(f), vips_source(f)
    buf = bytearray(100)
    assert src._read(buf) == 100 and bytes(buf) == data[:100]
    assert src._seek(0, os.SEEK_CUR) == 100
    assert src._seek(50, os.SEEK_CUR) == 150
    assert src._seek(-30, os.SEEK_END) == len(data) - 30
    assert src._read(buf) == 30 and bytes(buf[:30]) == data[-30:]
    assert src._read(buf) == 0  # at the end
    assert src._seek(7, os.SEEK_SET) == 7
    assert src._seek(-8, os.SEEK_CUR) == -1 and src._seek(0, 3) == -1  # refused, unmoved
    assert src._read(buf) == 100 and bytes(buf) == data[7:107]
    assert other._read(bytearray(5)) == 5 and other.position == 5 and src.position == 107


def test_truncated_tiff_is_a_value_error_naming_the_file(pyramid_tif: Path, tmp_path: Path) -> None:
    """Bad content (the bytes arrived, they are not a readable TIFF) is a ValueError naming
    the file; a bare ``pyvips.Image.new_from_source`` raises pyvips' own error."""
    import pyvips

    whole = pyramid_tif.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole[: len(whole) // 3])
    src = vips_source(BlockCachedFile(str(cut)))
    with pytest.raises(ValueError, match=r"cut\.tif.*truncated or corrupt"):
        src.open(page=0)
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_source(vips_source(BlockCachedFile(str(cut))), "", page=0)


def test_storage_error_in_the_read_callback_comes_back_as_itself(
    pyramid_tif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvips only sees "read failed" (-1, never a silent end of file that could decode as
    black); ``source.errors()`` raises the storage error the callback recorded."""
    f = BlockCachedFile(str(pyramid_tif), block_size=4096, max_blocks=4)
    src = vips_source(f)
    image = src.open(page=0)

    def gone(start: int, length: int) -> bytes:
        raise rangeio.storage.StorageNotFound(f"{f.uri!r} (bytes {start}-): vanished")

    monkeypatch.setattr(f, "_read_range", gone)
    with pytest.raises(rangeio.storage.StorageNotFound, match="vanished"), src.errors():
        image.crop(512, 512, 256, 256).numpy()
    assert src.error is None  # consumed
