"""The whole-slide job store: one ``state.json`` per job under a storage prefix (a path or
``s3://``), beside the job's result files.

Every write of a state goes through ``storage.write_bytes`` (a temporary file renamed over
the old one on disk, one PUT on S3), so a reader sees the old state or the new one, never a
part, and a job survives the replica that ran it: a restarted job runner re-reads the store
and resumes what was queued or running. One writer per job (the job runner); readers (the
ingress) only read.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from foveation.io import storage
from foveation.serving.errors import RequestError

STATE_FILE = "state.json"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, RUNNING, *FINAL)


@dataclass(frozen=True)
class JobRecord:
    id: str
    slide_uri: str
    state: str = QUEUED
    progress: float = 0.0
    """Fraction of the slide's rows segmented (0..1); 1 once results are written."""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    attempts: int = 0
    """Times a runner started the job (more than 1 after a runner restart)."""
    cancel_requested: bool = False
    error: str | None = None
    results: dict[str, str] = field(default_factory=dict)
    """name -> URI: labels (OME-TIFF), heatmap, probabilities, apsm, geojson."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Slide size, class fractions, timing."""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"job {self.id}: state {self.state!r} not one of {STATES}")

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_job_id(job_id: str) -> str:
    """A job id as this store makes them (32 hex digits), or 404: ids are never paths."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise RequestError(
            404, "unknown_job", f"job {str(job_id)[:80]!r}: no such job (ids are 32 hex digits)"
        )
    return job_id


class JobStore:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") if root.startswith("s3://") else root

    def uri(self, job_id: str, name: str = "") -> str:
        check_job_id(job_id)
        return storage.join(self.root, job_id, name) if name else storage.join(self.root, job_id)

    def create(self, slide_uri: str, options: dict[str, Any] | None = None) -> JobRecord:
        rec = JobRecord(id=uuid.uuid4().hex, slide_uri=slide_uri, options=dict(options or {}))
        self.put(rec)
        return rec

    def put(self, rec: JobRecord) -> JobRecord:
        storage.write_bytes(self.uri(rec.id, STATE_FILE), json.dumps(rec.to_dict()).encode())
        return rec

    def update(self, rec: JobRecord, **changes: Any) -> JobRecord:
        return self.put(replace(rec, updated=time.time(), **changes))

    def get(self, job_id: str) -> JobRecord:
        """The job's stored state, or 404 (an unknown or malformed id)."""
        uri = self.uri(check_job_id(job_id), STATE_FILE)
        try:
            data = storage.read_bytes(uri)
        except storage.StorageNotFound:
            raise RequestError(404, "unknown_job", f"job {job_id!r}: no such job") from None
        return _record(json.loads(data))

    def list(self) -> list[JobRecord]:
        """Every job in the store (oldest first); unreadable states are skipped."""
        if not storage.exists(self.root):
            return []
        out = []
        for uri in storage.list_files(self.root, STATE_FILE):
            try:
                out.append(_record(json.loads(storage.read_bytes(uri))))
            except (ValueError, TypeError, storage.StorageError):
                continue
        return sorted(out, key=lambda r: r.created)


def _record(d: dict[str, Any]) -> JobRecord:
    known = JobRecord.__dataclass_fields__
    return JobRecord(**{k: v for k, v in d.items() if k in known})
