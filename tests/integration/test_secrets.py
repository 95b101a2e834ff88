"""Credentials never travel in a job's runtime environment: anyone holding the cluster's token
can read a runtime environment through the job API and the state API, so a job forwards only
storage settings (``raycluster.FORWARDED_ENV``) and its workers read credentials from their
own node (docs/operations.md#credentials).

A job is submitted to the session's head node with ``ray job submit`` (as a user would) with a
sentinel secret and a sentinel setting in its driver's environment, both read from files so
that neither is in the entry point's text. The setting must show in the APIs (so the test
reads where a runtime environment shows) and the secret nowhere; the job's task must see its
node's credentials, not the driver's."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid

DRIVER = """
import os, ray
from foveation.raycluster import init_ray
init_ray()
seen = ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote())
print("task sees driver secret:", seen == os.environ["AWS_SECRET_ACCESS_KEY"])
"""


def _everything(dashboard: str, job_id: str) -> str:
    """What the job API and the state API tell about jobs, tasks and actors, as one text."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_jobs, list_tasks

    client = JobSubmissionClient(dashboard)
    parts = [client.get_job_info(job_id), client.list_jobs()]
    for listing in (list_jobs, list_tasks, list_actors):
        parts.append(
            listing(address=dashboard, detail=True, limit=1000, raise_on_missing_output=False)
        )
    return json.dumps(parts, default=lambda o: getattr(o, "__dict__", str(o)))


def test_a_jobs_secret_is_in_neither_the_job_api_nor_the_state_api(ray_dashboard, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    secret, setting = f"sentinel-secret-{uuid.uuid4().hex}", f"sentinel-setting-{uuid.uuid4().hex}"
    (tmp_path / "secret").write_text(secret)
    (tmp_path / "setting").write_text(setting)
    (tmp_path / "driver.py").write_text(DRIVER)
    command = (
        f"cd {shlex.quote(root)} && PYTHONPATH=platform:. "
        f'AWS_SECRET_ACCESS_KEY="$(cat {tmp_path}/secret)" '
        f'RAY_DATA_DISABLE_PROGRESS_BARS="$(cat {tmp_path}/setting)" '
        f"exec {shlex.quote(sys.executable)} {tmp_path}/driver.py"
    )
    job_id = f"secrets-{uuid.uuid4().hex[:8]}"
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    r = subprocess.run(
        [
            ray_bin,
            "job",
            "submit",
            "--address",
            ray_dashboard,
            "--submission-id",
            job_id,
            "--",
            "bash",
            "-c",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RAY_AUTH_MODE="token"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "task sees driver secret: False" in r.stdout, r.stdout[-3000:]

    seen = _everything(ray_dashboard, job_id)
    assert setting in seen, "the forwarded setting should show: the test reads the wrong place"
    assert secret not in seen
