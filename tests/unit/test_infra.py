"""The shipped infrastructure files, checked without a cluster: Prometheus's own checker on
the scrape config and alert rules (and its rule unit tests), every dashboard panel's PromQL
parsed by Prometheus and naming only metrics that exist, and the cluster manifests parsed,
validated where a schema is at hand (Ray's cluster-launcher schema, the Serve app's typed
arguments, the platform's configs) and pointing at jobs, configs and the image in this repo.
The real Prometheus scraping a running platform is tests/integration/test_monitoring_stack.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from foveation import monitoring

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DASHBOARDS = sorted((INFRA / "grafana/dashboards").glob("*.json"))
MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "10s", "$run": ".+"}
# Ray's own metrics the dashboards and alerts read (their names are checked in Ray's source).
RAY_METRICS = {
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_status",
    "ray_serve_deployment_queued_queries",
    "ray_serve_replica_processing_queries",
}
PROMQL_BUILTINS = {"up", "time", "vector", "le"}


def run_promtool(promtool: str, *args: str, cwd: Path = INFRA / "prometheus") -> str:
    r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_promtool_accepts_the_scrape_config_and_the_alert_rules(promtool):
    out = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out
    out = run_promtool(promtool, "check", "rules", "alerts.yml")
    assert re.search(r"SUCCESS: [5-9] rules found", out), out


def test_each_alert_fires_on_its_case_and_not_on_healthy_series(promtool):
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", "alerts_test.yml")


def test_a_broken_alert_fails_its_rule_test(promtool, tmp_path):
    """The rule tests can fail: a threshold moved out of reach makes them fail."""
    shutil.copytree(INFRA / "prometheus", tmp_path / "p")
    rules = tmp_path / "p/alerts.yml"
    rules.write_text(rules.read_text().replace("> 600", "> 6000"))
    r = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "p",
    )
    assert r.returncode != 0 and "FoveationTrainingStalled" in r.stdout + r.stderr


def test_scrape_config_reads_rays_service_discovery_and_the_app_targets():
    conf = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert set(jobs) == {"ray", "foveation-app"}
    (ray_files,) = [c["files"] for c in jobs["ray"]["file_sd_configs"]]
    assert ray_files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    for pattern in jobs["foveation-app"]["file_sd_configs"][0]["files"]:
        targets = list((INFRA / "prometheus").glob(pattern))
        assert targets, pattern
        for t in targets:
            assert isinstance(json.loads(t.read_text()), list)


# ------------------------------------------------------------------------------ dashboards


def panels():
    for path in DASHBOARDS:
        for p in json.loads(path.read_text())["panels"]:
            yield path.stem, p


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not inside a label matcher, not a
    function or keyword (followed by '(' or after by/on/without)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    keywords = {"and", "or", "unless", "bool", "offset", "inf", "nan", "e"}
    return {n for n in names if n not in keywords and not n[0].isdigit()} - PROMQL_BUILTINS


def series_of(name: str) -> str:
    """``ray_foveation_x_bucket`` -> ``foveation_x`` (the METRICS key)."""
    base = name.removeprefix("ray_")
    for suffix in ("_bucket", "_count", "_sum"):
        if base.endswith(suffix) and base.removesuffix(suffix) in monitoring.METRICS:
            return base.removesuffix(suffix)
    return base


def check_metric_names(where: str, expr: str) -> set[str]:
    used = set()
    for name in metric_names(expr):
        if name in RAY_METRICS:
            continue
        assert name.startswith("ray_foveation_"), f"{where}: unknown metric {name} in {expr}"
        key = series_of(name)
        assert key in monitoring.METRICS, f"{where}: {name} is not in monitoring.METRICS"
        if monitoring.METRICS[key].kind == "histogram":
            assert name != f"ray_{key}", f"{where}: histogram {name} read without _bucket"
        used.add(key)
    return used


def test_dashboards_are_well_formed_and_read_the_provisioned_datasource():
    ds = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (uid,) = [d["uid"] for d in ds["datasources"]]
    assert {p.stem for p in DASHBOARDS} == {"data", "training", "evaluation", "serving"}
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] not in uids and d["title"].startswith("Foveation / "), path
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in d["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, (path.name, p["title"])
            assert p["datasource"]["uid"] == uid, (path.name, p["title"])
            refs = [t["refId"] for t in p["targets"]]
            assert p["targets"] and len(refs) == len(set(refs)), (path.name, p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["expr"].strip()
        for var in d.get("templating", {}).get("list", []):
            assert var["datasource"]["uid"] == uid


def test_every_panel_query_parses_and_every_metric_is_defined_and_shown(promtool, tmp_path):
    shown: set[str] = set()
    rules = []
    for name, p in panels():
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{name}/{p['title']}: unknown variable in {expr}"
            shown |= check_metric_names(f"{name}/{p['title']}", expr)
            rules.append({"record": f"panel:{name}:{len(rules)}", "expr": expr})
    # Prometheus's own parser on every panel query, as recording rules.
    (tmp_path / "panels.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "p", "rules": rules}]})
    )
    out = run_promtool(promtool, "check", "rules", str(tmp_path / "panels.yml"))
    assert f"SUCCESS: {len(rules)} rules found" in out
    # Every metric the platform defines is on some dashboard (none recorded for nothing).
    assert shown == set(monitoring.METRICS), set(monitoring.METRICS) - shown


def test_alert_rules_read_only_defined_metrics():
    rules = yaml.safe_load((INFRA / "prometheus/alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            check_metric_names(r["alert"], r["expr"])


def test_the_ray_metrics_the_dashboards_read_exist_in_ray():
    import ray

    src = Path(ray.__file__).parent / "serve/_private"
    text = "".join(p.read_text() for p in src.glob("*.py"))
    for name in RAY_METRICS:
        assert f'"{name.removeprefix("ray_")}"' in text, name


def test_grafana_provisioning_points_at_the_dashboards_and_rays():
    prov = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/foveation.yml").read_text())
    paths = {p["name"]: p["options"]["path"] for p in prov["providers"]}
    assert paths["foveation"] == "${FOVEATION_DASHBOARDS}"
    assert paths["ray"].endswith("session_latest/metrics/grafana/dashboards")


# ------------------------------------------------------------------------------- manifests


def image_name() -> str:
    """``foveation:<version>``, the image infra/docker/Dockerfile builds (its labels)."""
    text = (INFRA / "docker/Dockerfile").read_text()
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', text).group(1)
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == project, "the image's version label is the project's version"
    return f"{title}:{version}"


def test_the_dockerfile_copies_files_that_exist_and_says_it_is_untested():
    text = (INFRA / "docker/Dockerfile").read_text()
    assert "UNTESTED" in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in shlex.split(line)[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src


def containers(doc: dict):
    """Every container of a RayJob / RayService / RayCluster spec."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for g in groups:
        yield g, from_template(g)


def from_template(group: dict):
    return group["template"]["spec"]["containers"]


def entrypoint_job(entrypoint: str):
    """The ``jobs.<name>`` module and its parsed arguments of a RayJob's entrypoint."""
    import importlib

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    assert (ROOT / (argv[2].replace(".", "/") + ".py")).exists(), argv[2]
    module = importlib.import_module(argv[2])
    return module, module.parser().parse_args(argv[3:])


def test_kuberay_manifests_use_the_image_and_the_repos_jobs_and_configs():
    from foveation.config import load_config

    image = image_name()
    kinds = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(path.name)
            if doc["kind"] not in ("RayJob", "RayService"):
                continue
            assert doc["apiVersion"] == "ray.io/v1", path
            for group, cs in containers(doc):
                for c in cs:
                    assert c["image"] == image, (path.name, c["name"], c["image"])
                    assert c["workingDir"] == "/app"
                assert group["rayStartParams"]["metrics-export-port"] == "8080"
            cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
            assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
            if doc["kind"] == "RayJob":
                _, args = entrypoint_job(doc["spec"]["entrypoint"])
                load_config(ROOT / args.config)  # a config that exists and validates
    assert sorted(kinds["RayJob"]) == ["rayjob-train.yaml", "rayjob-tune.yaml"]
    assert kinds["RayService"] == ["rayservice.yaml"]


def test_the_training_rayjob_has_a_gpu_worker_per_configured_worker():
    from foveation.config import load_config

    doc = yaml.safe_load((INFRA / "kuberay/rayjob-train.yaml").read_text())
    module, args = entrypoint_job(doc["spec"]["entrypoint"])
    assert module.__name__ == "jobs.train" and args.resume
    cfg = load_config(ROOT / args.config)
    assert cfg.distributed.use_gpu and cfg.training.precision == "bf16"
    (gpu,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    per_pod = int(from_template(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert (
        gpu["replicas"] * per_pod == cfg.distributed.num_workers * cfg.distributed.gpus_per_worker
    )
    tune = yaml.safe_load((INFRA / "kuberay/rayjob-tune.yaml").read_text())
    module, _ = entrypoint_job(tune["spec"]["entrypoint"])
    assert module.__name__ == "jobs.tune"


def test_the_rayservice_runs_the_local_serve_app_with_gpu_autoscaling():
    from foveation.serving.settings import load_serve_config
    from serve.app import AppArgs

    doc = yaml.safe_load((INFRA / "kuberay/rayservice.yaml").read_text())
    remote = yaml.safe_load(doc["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve/serve.yaml").read_text())
    (app,), (local_app,) = remote["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local_app[key], key
    assert app["args"]["config"] == local_app["args"]["config"]
    args = AppArgs.model_validate(app["args"])  # the app's own typed arguments
    settings = load_serve_config(args.config, {**args.settings, "device": args.device})
    assert settings.device == "cuda" and settings.model.num_gpus >= 1
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    per_pod = int(from_template(gpu)[0]["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod >= 1 and gpu["minReplicas"] == 0
    # At full load every model replica and every concurrent slide task holds its GPUs at once:
    # the GPU pods the autoscaler may add must hold them all.
    needed = (
        settings.autoscaling.max_replicas * settings.model.num_gpus
        + settings.jobs.max_concurrent * settings.jobs.task_gpus * (settings.jobs.run_as == "tasks")
    )
    assert gpu["maxReplicas"] * per_pod >= needed, (gpu["maxReplicas"], per_pod, needed)


def test_the_cluster_launcher_yaml_passes_rays_schema_and_has_gpu_workers():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    conf = yaml.safe_load((INFRA / "cluster/ray-cluster.yaml").read_text())
    validate_config(fillout_defaults(conf))  # raises on a field Ray does not know
    assert conf["docker"]["image"] == image_name()
    types = conf["available_node_types"]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["max_workers"] > 0 for t in gpu)
    # The dashboard (and its job API) is reached through `ray dashboard`'s SSH tunnel, so the
    # head binds it to loopback, never to every interface.
    (head,) = [c for c in conf["head_start_ray_commands"] if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    starts = " ".join(conf["head_start_ray_commands"] + conf["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2


def _pods(doc: dict) -> list[dict]:
    """Every pod template (head and worker groups) of a RayJob or RayService."""
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


@pytest.mark.parametrize("name", ["rayjob-train", "rayjob-tune", "rayservice"])
def test_secrets_are_mounted_files_never_a_ray_process_environment(name):
    """A Ray process's environment is what its workers inherit and what job and state APIs can
    show: the manifests mount the secrets read-only and point at the files instead."""
    doc = yaml.safe_load((INFRA / f"kuberay/{name}.yaml").read_text())
    for pod in _pods(doc):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        (container,) = pod["containers"]
        assert "envFrom" not in container, container["name"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FOVEATION_SERVE_TOKEN"} & set(
            env
        )
        assert all("valueFrom" not in e for e in env.values()), env
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        creds = env["AWS_SHARED_CREDENTIALS_FILE"]["value"]
        mount = mounts[os.path.dirname(creds)]
        assert (
            mount["readOnly"] and volumes[mount["name"]]["secret"]["secretName"] == "foveation-s3"
        )
        assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o400
    if name == "rayservice":
        app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
        token = app["args"]["settings"]["auth"]["token_file"]
        for pod in _pods(doc):
            (container,) = pod["containers"]
            assert os.path.dirname(token) in {m["mountPath"] for m in container["volumeMounts"]}
