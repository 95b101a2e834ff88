"""Settings of the Serve app: the shipped TOML and YAML load, bad values fail naming the
field, and the app builder turns them into deployment options (no Ray cluster needed)."""

import pytest
import yaml

from foveation.config import ConfigError
from foveation.serving.settings import ServeConfig, load_serve_config, serve_config_from_dict


def test_shipped_serve_config_and_yaml_load(root):
    cfg = load_serve_config(root / "serve/serve.toml")
    assert isinstance(cfg, ServeConfig) and cfg.batching.enabled
    doc = yaml.safe_load((root / "serve/serve.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "serve.app:build_app"
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    ServeDeploySchema.model_validate(doc)  # what `serve deploy` checks first
    args = AppArgs.model_validate(app["args"])
    merged = load_serve_config(root / args.config, args.settings)
    assert merged.autoscaling.max_replicas == 4 and merged.limits == cfg.limits


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"limits": {"max_pixels": 0}}, "serve.limits.max_pixels"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
        ({"model": {"max_queued_requests": 0}}, "max_queued_requests"),
        ({"jobs": {"heatmap": "colours"}}, "serve.jobs.heatmap"),
        ({"jobs": {"allowed_prefixes": ["runs/../etc"]}}, "allowed_prefixes"),
        ({"device": "tpu"}, "serve.device"),
        ({"device": "cuda"}, "num_gpus"),
        ({"batching": {"wait_timeout_s": "soon"}}, "serve.batching.wait_timeout_s"),
        ({"nonsense": 1}, "unknown key"),
        ({"limits": {"replica_wait_s": 0}}, "serve.limits.replica_wait_s"),
        ({"runner": {"resources": {"gpu_node": -1}}}, "serve.<deployment>.resources"),
        ({"model": {"max_surge_percent": 101}}, "serve.<deployment>.max_surge_percent"),
        ({"runner": {"max_surge_percent": 100}}, "serve.runner.max_surge_percent"),
        ({"model": {"max_replicas_per_node": 0}}, "serve.<deployment>.max_replicas_per_node"),
    ],
)
def test_bad_settings_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        serve_config_from_dict(data)


def test_a_settings_file_error_names_the_file_and_the_field(tmp_path):
    p = tmp_path / "serve.toml"
    p.write_text("[serve.limits]\nmax_pixels = 0\n")
    with pytest.raises(
        ConfigError, match=r"serve config file .*serve\.toml.*serve\.limits\.max_pixels"
    ):
        load_serve_config(p)
    with pytest.raises(ConfigError, match=r"serve config file .*missing\.toml.* does not exist"):
        load_serve_config(tmp_path / "missing.toml")
    p.write_text("[serve.limits]\nmax_pixels = 7\n")
    cfg = load_serve_config(p, {"limits": {"max_body_bytes": 2048}, "device": "cpu"})
    assert cfg.limits.max_pixels == 7 and cfg.limits.max_body_bytes == 2048


def test_token_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", " abc ")
    assert serve_config_from_dict({"auth": {"token_env": "MY_TOKEN"}}).auth.read_token() == "abc"
    monkeypatch.delenv("FOVEATION_SERVE_TOKEN", raising=False)
    assert serve_config_from_dict({}).auth.read_token() == ""
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert serve_config_from_dict({"auth": {"token_file": str(f)}}).auth.read_token() == "from-file"
    with pytest.raises(ConfigError, match="token_file"):
        serve_config_from_dict({"auth": {"token_file": str(tmp_path / "no")}}).auth.read_token()


def test_builder_sets_autoscaling_queues_and_resources(tmp_path):
    from serve.app import AppArgs, build_app

    app = build_app(
        AppArgs(
            checkpoint=str(tmp_path / "never-loaded-here"),
            settings={
                "autoscaling": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 1},
                "model": {"num_cpus": 0.25, "max_ongoing_requests": 2, "max_queued_requests": 3},
            },
        )
    )
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert model.name == "ModelServer"
    auto = model._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s) == (1, 3, 1)
    assert model._deployment_config.max_ongoing_requests == 2
    assert model._deployment_config.max_queued_requests == 3
    assert model.ray_actor_options["num_cpus"] == 0.25
    runner = ingress.init_args[1]._bound_deployment
    assert runner.num_replicas == 1
    with pytest.raises(Exception, match="checkpoint"):
        AppArgs.model_validate({})


def test_serve_calls_the_builder_with_typed_arguments(tmp_path):
    """What `serve run serve.app:build_app checkpoint=... config=...` does with its args."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve.app import build_app

    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"checkpoint": str(tmp_path), "config": "serve/serve.toml", "device": "cpu"}
    )
    assert isinstance(app, Application)
    with pytest.raises(Exception, match=r"[Ee]xtra"):
        call_user_app_builder_with_args_if_necessary(build_app, {"checkpoint": "x", "typo": 1})


def test_a_replica_asks_for_its_custom_resources():
    cfg = serve_config_from_dict({"runner": {"num_cpus": 0.5, "resources": {"gpu_node": 1}}})
    assert cfg.runner.actor_options() == {"num_cpus": 0.5, "resources": {"gpu_node": 1.0}}
    assert "resources" not in cfg.model.actor_options()
