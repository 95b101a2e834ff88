"""``foveation.io.storage`` on local disk and on a real S3 endpoint (moto's server on 127.0.0.1):
round trips, atomic writes, error messages, dead endpoints failing fast, and retries."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from foveation.io import storage
from foveation.io.storage import ErrorKind, RetryPolicy


@pytest.fixture(autouse=True)
def _restore_storage_options() -> Iterator[None]:
    previous = storage.configure()
    yield
    storage.configure(previous)


@pytest.fixture(params=["path", "file-uri", "s3"])
def base(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty location in each of the three URI forms."""
    if request.param == "path":
        return str(tmp_path / "base")
    if request.param == "file-uri":
        return f"file://{tmp_path / 'base'}"
    return request.getfixturevalue("s3_bucket") + "/base"


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]


# ------------------------------------------------------------------------------ round trips


def test_round_trip(base: str, tmp_path) -> None:
    payload = bytes(range(256)) * 40
    uri = storage.join(base, "slides", "a.bin")
    storage.write_bytes(uri, payload)

    assert storage.exists(uri)
    assert storage.exists(storage.join(base, "slides"))
    assert not storage.exists(storage.join(base, "slides", "nope.bin"))
    assert storage.read_bytes(uri) == payload
    assert storage.size(uri) == len(payload)

    local = tmp_path / "downloaded" / "a.bin"
    storage.download_file(uri, local)
    assert local.read_bytes() == payload
    storage.upload_file(local, storage.join(base, "slides", "sub", "B.SVS"))
    storage.write_bytes(storage.join(base, "label.png"), b"png")
    storage.write_bytes(storage.join(base, ".hidden", "x.bin"), b"hidden")

    everything = storage.list_files(base)
    assert everything == [
        storage.join(base, "label.png"),
        storage.join(base, "slides", "a.bin"),
        storage.join(base, "slides", "sub", "B.SVS"),
    ]
    assert storage.list_files(base, suffixes=[".svs", ".png"]) == [
        storage.join(base, "label.png"),
        storage.join(base, "slides", "sub", "B.SVS"),
    ]
    assert storage.list_files(uri) == [uri]

    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(storage.join(base, "slides"))
    assert storage.list_files(base) == [storage.join(base, "label.png")]
    with pytest.raises(storage.StorageNotFound, match="nope"):
        storage.delete(storage.join(base, "nope"))
    storage.delete(storage.join(base, "nope"), missing_ok=True)


def test_large_upload_round_trip(base: str, tmp_path) -> None:
    """20 MiB through ``upload_file``: on S3 a multipart upload (over the 8 MiB threshold)."""
    chunk = os.urandom(1 << 20)
    local = tmp_path / "big.tif"
    local.write_bytes(chunk * 20)
    uri = storage.join(base, "big.tif")
    storage.upload_file(local, uri)
    assert storage.size(uri) == 20 << 20
    assert storage.read_bytes(uri)[19 << 20 :] == chunk


def test_staging_dir_appears_only_on_success(base: str) -> None:
    uri = storage.join(base, "checkpoint")
    with pytest.raises(RuntimeError), storage.local_staging_dir(uri) as tmp:
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"weights")
        raise RuntimeError("crash while saving")
    assert not storage.exists(uri)

    with storage.local_staging_dir(uri) as tmp:
        os.makedirs(os.path.join(tmp, "deepspeed"))
        for name in ("model.safetensors", "meta.json", "deepspeed/state.pt"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(name.encode())
    files = storage.committed(uri)  # S3: the version its COMMITTED pointer names
    assert storage.list_files(files) == [
        storage.join(files, "deepspeed", "state.pt"),
        storage.join(files, "meta.json"),
        storage.join(files, "model.safetensors"),
    ]
    assert storage.read_bytes(storage.join(files, "meta.json")) == b"meta.json"


def test_a_staged_write_failing_half_way_leaves_the_previous_one_whole(
    base: str, monkeypatch
) -> None:
    """A disk that fills (ENOSPC) while the second file of a new checkpoint is written, or
    its upload: the checkpoint already there stays whole and readable, nothing half-new."""
    import errno

    uri = storage.join(base, "checkpoint")

    def save(tag: str, fail_after: int | None = None) -> None:
        calls = {"n": 0}
        real_upload = storage.upload_file

        def upload(local, target):  # S3: the storage layer's upload runs out of space
            calls["n"] += 1
            if fail_after is not None and calls["n"] > fail_after:
                raise OSError(errno.ENOSPC, "No space left on device", target)
            return real_upload(local, target)

        monkeypatch.setattr(storage, "upload_file", upload)
        try:
            with storage.local_staging_dir(uri) as tmp:
                for i, name in enumerate(("a.bin", "b.bin", "meta.json")):
                    if fail_after is not None and not storage.is_remote(uri) and i == fail_after:
                        raise OSError(errno.ENOSPC, "No space left on device", name)
                    with open(os.path.join(tmp, name), "w") as f:
                        f.write(f"{tag}:{name}")
        finally:
            monkeypatch.setattr(storage, "upload_file", real_upload)

    def contents() -> dict[str, str]:
        files = storage.committed(uri)
        return {
            u.rsplit("/", 1)[1]: storage.read_bytes(u).decode() for u in storage.list_files(files)
        }

    save("old")
    with pytest.raises(OSError) as err:
        save("new", fail_after=1)
    assert err.value.errno == errno.ENOSPC
    assert contents() == {n: f"old:{n}" for n in ("a.bin", "b.bin", "meta.json")}
    save("newer")
    assert contents() == {n: f"newer:{n}" for n in ("a.bin", "b.bin", "meta.json")}
    if storage.is_remote(uri):  # the replaced version is gone; the failed one's files may stay
        versions = {u.split("/checkpoint/")[1].split("/")[0] for u in storage.list_files(uri)}
        assert storage.committed(uri).rsplit("/", 1)[1] in versions and "COMMITTED" in versions


def test_a_model_checkpoint_survives_a_save_that_runs_out_of_space(s3_bucket, root, monkeypatch):
    """save_checkpoint over an existing S3 checkpoint, its second upload failing with ENOSPC:
    load_checkpoint still returns the first model, weights equal."""
    import errno

    import torch

    from foveation.checkpoint import load_checkpoint, save_checkpoint
    from foveation.config import load_config
    from foveation.models.foveated import build_model

    cfg = load_config(root / "jobs/configs/tiny.toml")
    uri = f"{s3_bucket}/models/m"
    torch.manual_seed(0)
    first = build_model(cfg)
    save_checkpoint(uri, first, cfg, {"step": 1})
    torch.manual_seed(1)
    second = build_model(cfg)
    real_upload, calls = storage.upload_file, {"n": 0}

    def upload(local, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", target)
        return real_upload(local, target)

    monkeypatch.setattr(storage, "upload_file", upload)
    with pytest.raises(OSError):
        save_checkpoint(uri, second, cfg, {"step": 2})
    monkeypatch.setattr(storage, "upload_file", real_upload)
    model, _, meta = load_checkpoint(uri)
    assert meta["step"] == 1
    for k, v in first.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# -------------------------------------------------------------------------------- atomicity


class _FailingSource:
    """A readable file that breaks after ``limit`` bytes, as a dying disk or pipe does."""

    def __init__(self, limit: int) -> None:
        self.limit, self.done = limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.done >= self.limit:
            raise OSError("source broke after 20 MiB")
        n = 1 << 20 if n is None or n < 0 else n
        self.done += n
        return b"x" * n

    def __enter__(self) -> _FailingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_s3_upload_failing_midway_is_aborted_not_completed(s3_bucket: str, s3_client) -> None:
    """The upload primitive itself: a multipart upload whose source breaks after two parts
    leaves no object and no pending upload (pyarrow's output stream would complete it)."""
    uri = f"{s3_bucket}/broken.tif"
    with pytest.raises(storage.StorageError, match="source broke"):
        storage._put_object(storage._locate(uri), lambda: _FailingSource(20 << 20))
    assert not storage.exists(uri)
    assert "Uploads" not in s3_client.list_multipart_uploads(Bucket=s3_bucket[5:])


# ----------------------------------------------------------------------------------- errors


def test_bad_local_paths_and_schemes_are_named(tmp_path) -> None:
    path = str(tmp_path / "nope.png")
    with pytest.raises(storage.StorageNotFound, match=r"nope\.png.*expected an existing file"):
        storage.read_bytes(path)
    with pytest.raises(storage.StorageNotFound, match=r"nope\.png"):
        storage.list_files(path)
    with pytest.raises(storage.StorageNotFound, match="no such local file"):
        storage.upload_file(path, str(tmp_path / "copy.png"))
    with pytest.raises(storage.StorageError, match="is a directory"):
        storage.write_bytes(str(tmp_path), b"x")
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(f".{tmp_path.name}.")]
    with pytest.raises(storage.StorageError, match=r"unsupported storage URI.*s3://"):
        storage.read_bytes("gs://bucket/key")


def test_missing_key_is_reported_at_once(s3_bucket: str, caplog) -> None:
    uri = f"{s3_bucket}/slides/nope.svs"
    with pytest.raises(storage.StorageNotFound) as err:
        storage.read_bytes(uri)
    message = str(err.value)
    assert uri in message and "expected an existing file" in message
    assert "bucket" not in message
    for call in (storage.size, storage.list_files):
        with pytest.raises(storage.StorageNotFound, match=r"nope\.svs"):
            call(uri)
    assert _retry_warnings(caplog) == []  # a 404 is never retried


def test_missing_bucket_is_named(s3_endpoint: str, caplog) -> None:
    uri = "s3://no-such-bucket-here/slides/a.svs"
    expected = f"bucket 'no-such-bucket-here' does not exist at {s3_endpoint}"
    for call in (
        storage.read_bytes,
        storage.list_files,
        storage.makedirs,
        lambda u: storage.write_bytes(u, b"x"),
    ):
        with pytest.raises(storage.StorageNotFound, match=re.escape(expected)):
            call(uri)
    assert not storage.exists(uri)
    assert _retry_warnings(caplog) == []


def _set_moto_auth(endpoint: str, free_requests: str) -> None:
    """moto checks signatures and IAM policies after ``free_requests`` more requests."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=free_requests.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


@contextmanager
def _user_denied_objects(endpoint: str) -> Iterator[dict[str, str]]:
    """Credentials of an IAM user that may list buckets but neither get nor put objects,
    with moto enforcing IAM for the duration."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"},
        ],
    }
    _set_moto_auth(endpoint, "3")  # the three IAM calls below run before IAM is enforced
    try:
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        iam.put_user_policy(UserName=user, PolicyName="deny", PolicyDocument=json.dumps(policy))
        yield {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
    finally:
        _set_moto_auth(endpoint, "inf")


def test_denied_access_is_a_permission_error(s3_bucket, s3_endpoint, monkeypatch, caplog) -> None:
    uri = f"{s3_bucket}/slides/a.svs"
    storage.write_bytes(uri, b"slide")
    with _user_denied_objects(s3_endpoint) as credentials:
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(storage.StoragePermissionError) as err:
            storage.read_bytes(uri)
        assert uri in str(err.value) and "access denied" in str(err.value)
        assert "AWS_ACCESS_KEY_ID" in str(err.value)
        with pytest.raises(storage.StoragePermissionError, match="access denied"):
            storage.write_bytes(f"{s3_bucket}/new.bin", b"x")
    assert _retry_warnings(caplog) == []  # a 403 is never retried
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"slide"  # the original identity's client is back


def test_closed_port_fails_fast_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    storage.configure(endpoint_url=endpoint)
    for call in (
        storage.exists,
        storage.read_bytes,
        storage.list_files,
        lambda u: storage.write_bytes(u, b"x"),
    ):
        start = time.monotonic()
        with pytest.raises(storage.StorageUnavailable) as err:
            call("s3://bucket/key.bin")
        assert time.monotonic() - start < 10
        assert endpoint in str(err.value) and "s3://bucket/key.bin" in str(err.value)


def test_silent_endpoint_fails_fast() -> None:
    """A server that accepts connections but never answers: the request timeout bounds each
    of the attempts, so the whole call fails in seconds."""
    with closing(socket.socket()) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        storage.configure(endpoint_url=endpoint, request_timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(storage.StorageUnavailable, match=re.escape(endpoint)):
            storage.exists("s3://bucket/key.bin")
        assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------- retries


def test_backoff_retries_transient_failures_then_succeeds(caplog) -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    policy = RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=1.0)
    with caplog.at_level(logging.WARNING, logger="foveation.io.storage"):
        assert storage.with_retries(flaky, policy, what="read s3://b/k") == "ok"
    assert len(calls) == 3
    # Delays of at least half the doubling cap (0.05 s, then 0.1 s): the backoff grows.
    assert calls[1] - calls[0] >= 0.025 and calls[2] - calls[1] >= 0.05
    assert len(_retry_warnings(caplog)) == 2


def test_backoff_gives_up_and_never_retries_permanent_failures() -> None:
    policy = RetryPolicy(attempts=3, base_delay_s=0.01)
    for exc, expected_calls in [
        (ConnectionError("down"), 3),
        (FileNotFoundError("no such key"), 1),
        (PermissionError("denied"), 1),
        (ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"), 1),
        (ValueError("a bug"), 1),
    ]:
        calls: list[int] = []

        def failing(exc: Exception = exc, calls: list[int] = calls) -> None:
            calls.append(1)
            raise exc

        with pytest.raises(type(exc)):
            storage.with_retries(failing, policy)
        assert len(calls) == expected_calls, exc


def _pyarrow_error(code: str) -> OSError:
    """An error as pyarrow's S3 filesystem raises it (format copied from real failures)."""
    return OSError(
        f"When reading information for key 'k' in bucket 'b': AWS Error {code} during "
        "HeadObject operation: Please try again. (Request ID: 403Z500Q)"
    )


def _client_error(code: str, status: int) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # pyarrow's messages, with request ids that hold "403" and "500" to be ignored
        (_pyarrow_error("SLOW_DOWN"), ErrorKind.TRANSIENT),
        (_pyarrow_error("SERVICE_UNAVAILABLE"), ErrorKind.TRANSIENT),
        (_pyarrow_error("INTERNAL_FAILURE"), ErrorKind.TRANSIENT),
        (_pyarrow_error("NETWORK_CONNECTION"), ErrorKind.TRANSIENT),
        (_pyarrow_error("ACCESS_DENIED"), ErrorKind.DENIED),
        (_pyarrow_error("INVALID_ACCESS_KEY_ID"), ErrorKind.DENIED),
        (_pyarrow_error("NO_SUCH_BUCKET"), ErrorKind.NOT_FOUND),
        # botocore's
        (_client_error("SlowDown", 503), ErrorKind.TRANSIENT),
        (_client_error("InternalError", 500), ErrorKind.TRANSIENT),
        (_client_error("Whatever", 502), ErrorKind.TRANSIENT),
        (_client_error("AccessDenied", 403), ErrorKind.DENIED),
        (_client_error("NoSuchKey", 404), ErrorKind.NOT_FOUND),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ErrorKind.TRANSIENT),
        (OSError("disk full"), ErrorKind.OTHER),
    ],
)
def test_error_classification(exc: BaseException, kind: ErrorKind) -> None:
    assert storage.classify_error(exc) is kind


def test_read_retries_until_the_endpoint_comes_up(s3_bucket: str, caplog) -> None:
    """A real transient failure: the endpoint refuses connections for 2 s, then a server
    (sharing the first one's in-process state) starts listening there. (2 s: the first read
    also creates the S3 client, which took over 0.5 s on a loaded 2-core machine, and a
    server already up by then tests nothing.)"""
    from moto.server import ThreadedMotoServer

    uri = f"{s3_bucket}/slides/a.svs"
    storage.write_bytes(uri, b"slide")
    port = _free_port()
    late = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    starter = threading.Timer(2.0, late.start)
    storage.configure(
        endpoint_url=f"http://127.0.0.1:{port}",
        retry=RetryPolicy(attempts=40, base_delay_s=0.1, max_delay_s=0.4),
    )
    starter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="foveation.io.storage"):
            assert storage.read_bytes(uri) == b"slide"
    finally:
        starter.join()
        late.stop()
    assert _retry_warnings(caplog), "the first attempts should have failed and been retried"


# ------------------------------------------------------------------------- configuration


def test_endpoint_sources_and_client_cache(s3_bucket: str, s3_endpoint: str) -> None:
    uri = f"{s3_bucket}/k.bin"
    storage.write_bytes(uri, b"data")  # endpoint from AWS_ENDPOINT_URL
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.S3FileSystem) and path == uri[5:]
    assert storage.resolve(f"{s3_bucket}/other")[0] is fs  # cached per endpoint

    storage.configure(endpoint_url=f"http://127.0.0.1:{_free_port()}")  # a dead one
    assert storage.resolve(uri)[0] is not fs
    explicit, _ = storage.resolve(uri, endpoint_url=s3_endpoint)  # the argument wins
    with explicit.open_input_stream(path) as f:
        assert f.read() == b"data"


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, foveation.io.storage as s;"
        "assert s._s3_filesystem.cache_info().currsize == 0;"
        "assert 'boto3' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_a_read_while_the_object_is_replaced_sees_one_whole_version(s3_bucket):
    """Readers see the old object or the whole new one, also while a writer replaces it with
    versions of other sizes (a slide job's state while its runner writes progress)."""
    uri = f"{s3_bucket}/jobs/state.json"
    versions = [
        json.dumps({"progress": i / 7, "pad": "x" * (i * 37 % 300)}).encode() for i in range(8)
    ]
    storage.write_bytes(uri, versions[0])
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            storage.write_bytes(uri, versions[i % len(versions)])

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = [storage.read_bytes(uri) for _ in range(150)]
    finally:
        stop.set()
        t.join()
    torn = [s for s in seen if s not in versions]
    assert not torn, f"{len(torn)} of {len(seen)} reads were torn, e.g. {torn[0][:80]!r}"
    assert len(set(seen)) > 1, "the writer never replaced the object during the reads"


# ---------------------------------------------------------------------------------- chaos


def test_an_s3_outage_of_20_s_during_an_ingest_fails_clearly_and_a_rerun_finishes(
    s3_bucket: str,
) -> None:
    """The object store goes away for 20 s after the second of six slides is ingested (the
    endpoint refuses connections, as a crashed MinIO would): the slides it hits fail with the
    endpoint named, the ingest ends without a manifest, and no half-written object is left.
    Once the endpoint is back, a rerun reuses the two finished slides and finishes."""
    from moto.server import ThreadedMotoServer

    from foveation.config import IngestConfig, PatchSetConfig, SyntheticConfig
    from foveation.data.ingest import IngestError, ingest
    from foveation.data.manifest import read_manifest
    from foveation.data.synthetic import write_synthetic_set
    from foveation.io.slides import SlideReader

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # shares the session endpoint's in-process state (the bucket)
    storage.configure(endpoint_url=f"http://127.0.0.1:{port}")
    src, dest = f"{s3_bucket}/raw", f"{s3_bucket}/out"
    write_synthetic_set(
        src, SyntheticConfig(n_slides=6, size=256, seed=5), PatchSetConfig(), log=lambda s: None
    )
    cfg = IngestConfig(crop_size=None, tile_size=128, compression="deflate")
    back = threading.Event()

    def outage_after_two(fn, items):
        for i, item in enumerate(items):
            if i == 2:  # the endpoint dies; it comes back 20 s later
                server.stop()
                timer = threading.Timer(20.0, lambda: (server.start(), back.set()))
                timer.start()
            yield fn(item)

    lines: list[str] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(IngestError) as err:
            ingest(src, dest, cfg, map_fn=outage_after_two, log=lines.append)
        assert "4 of 6 slides failed" in str(err.value), str(err.value)
        failed = [ln for ln in lines if "FAILED" in ln]
        assert len(failed) == 4 and all(f"127.0.0.1:{port}" in ln for ln in failed), failed
        assert back.wait(40), "the endpoint did not come back"
        assert time.monotonic() - t0 >= 20
        # nothing half-written: every object there is whole (rows parse, slides open)
        objects = storage.list_files(dest)
        assert not any(u.rsplit("/", 1)[1].startswith(".") for u in objects), objects
        for u in objects:
            if u.endswith(".json"):
                json.loads(storage.read_bytes(u))
            elif "/slides/" in u:
                SlideReader(u).close()
        assert not storage.exists(storage.join(dest, "manifest.parquet"))

        again = ingest(src, dest, cfg, log=lambda s: None)
        assert len(again.unchanged) == 2 and len(again.ingested) == 4, again
        assert read_manifest(dest).num_rows == 6
    finally:
        back.wait(40)
        server.stop()
