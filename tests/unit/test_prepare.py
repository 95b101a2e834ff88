"""prepare.ensure_store never deletes or overwrites a slide set this platform did not generate:
every job that calls it (jobs.reproduce, jobs.demo, jobs.tune) stops with an error naming the
folder, before Ray starts and with every file as it was."""

import dataclasses
import hashlib
import importlib
import re

import pytest

from foveation.config import load_config
from foveation.data.prepare import ForeignSetError, generation_needed, remove_generated

# A set in the Gleason layout written by some other tool: truth maps, six annotators' maps
# (Maps6_T included), no synthetic.json. The bytes need not decode: nothing may read them.
FOREIGN = {
    "Train Imgs/slide001_core001.jpg": b"\xff\xd8 not really a jpeg",
    "Maps1_T/slide001_core001_classimg_nonconvex.png": b"annotator 1",
    "Maps6_T/slide001_core001_classimg_nonconvex.png": b"annotator 6",
    "Synthetic Truth/slide001_core001_truth.png": b"truth",
    "notes.txt": b"where this set came from",
}


def checksums(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def foreign(tmp_path):
    root = tmp_path / "their-set"
    for name, data in FOREIGN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_config(repo, tmp_path, base, source):
    """jobs/configs/``base`` with the ingest source at ``source`` and an empty store."""
    cfg = load_config(repo / "jobs/configs" / base)
    ingest = dataclasses.replace(
        cfg.data.ingest, source=str(source), dest=str(tmp_path / f"store-{base}")
    )
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, ingest=ingest))
    path = tmp_path / base
    path.write_text(cfg.to_toml())
    return path


def refuse_ray(monkeypatch, job):
    """Starting Ray fails the test: the jobs must stop before it. The demo starts its quiet Ray
    before the data stage by design, so that start is counted instead (the list returned)."""
    import ray

    import foveation.raycluster

    started = []

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the foreign set was refused")

    monkeypatch.setattr(ray, "init", refuse)
    demo_start = lambda *a, **k: started.append(a)  # noqa: E731
    monkeypatch.setattr(
        foveation.raycluster, "init_ray", demo_start if job == "jobs.demo" else refuse
    )
    return started


@pytest.mark.parametrize(
    "job, base",
    [("jobs.reproduce", "tiny.toml"), ("jobs.tune", "tune-debug.toml"), ("jobs.demo", "tiny.toml")],
)
def test_every_job_refuses_a_foreign_set_and_leaves_it_as_it_was(
    job, base, foreign, tmp_path, root, monkeypatch, capsys
):
    started = refuse_ray(monkeypatch, job)
    before = checksums(foreign)
    cfg = write_config(root, tmp_path, base, foreign)
    out = tmp_path / "out"
    rc = importlib.import_module(job).main(["--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert str(foreign) in err and "synthetic.json" in err
    assert "jobs.ingest" in err and "another destination" in err  # how to go on
    assert checksums(foreign) == before  # nothing deleted, nothing rewritten, nothing added
    assert not (tmp_path / f"store-{base}").exists() and not out.exists()
    # ensure_store started nothing; the demo may start its quiet Ray before the data stage
    assert len(started) <= (job == "jobs.demo")


def test_generation_writes_only_where_it_is_empty_or_its_own(foreign, tmp_path, root):
    cfg = load_config(root / "jobs/configs/tiny.toml")
    assert generation_needed(cfg, str(tmp_path / "missing")) == "the source is empty"
    (tmp_path / "empty").mkdir()
    assert generation_needed(cfg, str(tmp_path / "empty")) == "the source is empty"
    with pytest.raises(ForeignSetError, match=re.escape(str(foreign))):
        generation_needed(cfg, str(foreign), str(tmp_path / "store"))
    with pytest.raises(ForeignSetError, match=re.escape(str(foreign))):
        remove_generated(str(foreign))
    # Ingested on purpose (jobs.ingest wrote the store's manifest): used as it is.
    (tmp_path / "store").mkdir()
    (tmp_path / "store/manifest.parquet").write_bytes(b"")
    assert generation_needed(cfg, str(foreign), str(tmp_path / "store")) is None
    # Real slides (no truth maps, no record): used as they are, as before.
    real = tmp_path / "real"
    (real / "Train Imgs").mkdir(parents=True)
    (real / "Train Imgs/slide001_core001.jpg").write_bytes(b"x")
    assert generation_needed(cfg, str(real), str(tmp_path / "nostore")) is None
