"""The driver's resource check before any worker starts: a shortfall the cluster's autoscaler
can close (GPU workers at ``min_workers = 0``) is a wait, one nothing can close is an error,
and reader CPUs count only when batches stream."""

import dataclasses

from foveation.config import Config, DistributedConfig
from foveation.raycluster import Growth, v1_names_node_types
from foveation.training.trainer import run_resources, shortfalls


def test_a_cluster_without_an_autoscaler_refuses_what_it_lacks():
    (short,) = shortfalls({"CPU": 2, "GPU": 4}, {"CPU": 8}, Growth())
    assert (short.name, short.need, short.have, short.most, short.fatal) == (
        "GPU",
        4,
        0,
        None,
        True,
    )


def test_an_autoscaler_that_can_add_the_gpus_is_waited_for():
    (short,) = shortfalls({"CPU": 2, "GPU": 4}, {"CPU": 8}, Growth(True, {"CPU": 40, "GPU": 8}))
    assert not short.fatal and short.most == 8


def test_an_autoscaler_too_small_for_the_run_is_refused():
    (short,) = shortfalls({"GPU": 16}, {"GPU": 1}, Growth(True, {"GPU": 8}))
    assert short.fatal and short.most == 8
    assert (
        shortfalls({"CPU": 6}, {"CPU": 8, "GPU": 0}, Growth(True, {"GPU": 8})) == []
    )  # enough now


def test_an_autoscaler_that_does_not_say_what_it_can_add_is_waited_for():
    (short,) = shortfalls({"GPU": 2}, {"CPU": 1}, Growth(autoscaled=True))
    assert short.most is None and not short.fatal


def test_v1_status_names_node_types_only_where_a_cluster_config_gives_them():
    # `ray start` by hand: the read-only provider names each node after its id.
    by_hand = {"autoscaler_report": {"active_nodes": {"node_64818aa4c79a": 1}}}
    assert not v1_names_node_types(by_hand) and not v1_names_node_types(None)
    launcher = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1}}}
    assert v1_names_node_types(launcher)
    pending = {"autoscaler_report": {"pending_nodes": [["127.0.0.1", "gpu", "setting-up"]]}}
    assert v1_names_node_types(pending)


def test_what_the_cluster_has_now_counts_when_the_autoscaler_knows_less():
    # A head node outside the autoscaler's node types still has its CPUs.
    assert shortfalls({"CPU": 4}, {"CPU": 4}, Growth(True, {"CPU": 0})) == []
    (short,) = shortfalls({"CPU": 6}, {"CPU": 4}, Growth(True, {"CPU": 2}))
    assert short.most == 4 and short.fatal


def test_reader_cpus_count_only_for_the_streamed_loader():
    cfg = Config()
    pc = cfg.data.pipeline
    workers = cfg.distributed.num_workers * cfg.distributed.cpus_per_worker
    assert run_resources(cfg, "memory")["CPU"] == workers
    assert run_resources(cfg, "stream")["CPU"] == workers + pc.reader_actors * pc.actor_cpus
    gpu = dataclasses.replace(cfg, distributed=DistributedConfig(use_gpu=True))
    assert (
        run_resources(gpu, "memory")["GPU"]
        == gpu.distributed.num_workers * gpu.distributed.gpus_per_worker
    )
