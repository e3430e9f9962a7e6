"""Placing a run's stages on a cluster's resources: the message when they cannot fit, and the wait when it can grow."""

import io
import contextlib
import time

import pytest

import vreason_batch.job.resources as resources
from vreason_batch.config import config_from_dict
from vreason_batch.job.resources import Unschedulable, WaitingNotice, check_schedulable, placement_problem


def cfg(**runtime):
    return config_from_dict({"input": {"manifest": "m.jsonl"}, "output": {"uri": "out"}, "runtime": runtime})


CPU2 = {"CPU": 2.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


def test_what_fits_has_no_problem():
    assert placement_problem([CPU2], cfg(num_cpus_per_actor=1)) is None
    assert placement_problem([CPU2, GPU_NODE], cfg(num_gpus_per_actor=1, num_actors=1)) is None
    assert placement_problem([GPU_NODE, GPU_NODE], cfg(num_gpus_per_actor=1, num_actors=2)) is None


def test_a_gpu_actor_on_a_cluster_without_gpus_names_the_key_and_the_cpu_way():
    msg = placement_problem([CPU2], cfg(num_gpus_per_actor=1))
    assert "runtime.num_gpus_per_actor" in msg and "no node has a GPU" in msg
    assert "runtime.num_gpus_per_actor=0 and model.device=cpu" in msg and "node 0: 2 CPU" in msg


def test_actors_that_take_every_cpu_leave_the_video_stage_none():
    msg = placement_problem([CPU2], cfg(num_cpus_per_actor=2))
    assert "leave none for the video stage" in msg and "runtime.num_cpus_per_actor" in msg
    # on two nodes the video task has the other one
    assert placement_problem([CPU2, CPU2], cfg(num_cpus_per_actor=2)) is None


def test_more_actors_than_fit_and_an_actor_larger_than_any_node():
    msg = placement_problem([GPU_NODE], cfg(num_gpus_per_actor=1, num_actors=3))
    assert "only 1 of runtime.num_actors=3" in msg
    assert "no node can hold one model actor" in placement_problem([CPU2], cfg(num_cpus_per_actor=4))


def test_an_autoscaling_pool_needs_room_for_its_min_only():
    # [1, 3] on a node with one GPU: starts with one actor; grows if the cluster does
    assert placement_problem([GPU_NODE], cfg(num_gpus_per_actor=1, num_actors=[1, 3])) is None
    msg = placement_problem([GPU_NODE], cfg(num_gpus_per_actor=1, num_actors=[2, 3]))
    assert "only 1 of the 2 runtime.num_actors=[2, 3] starts with" in msg


@pytest.mark.parametrize("bad", [[0, 2], [3, 2], [1, 2, 3], 0])
def test_an_actor_pool_is_a_count_or_min_max(bad):
    with pytest.raises(ValueError, match="num_actors"):
        cfg(num_actors=bad)


def test_a_cluster_that_cannot_grow_refuses_and_one_that_can_waits(monkeypatch):
    monkeypatch.setattr(resources, "cluster_nodes", lambda: [CPU2])
    monkeypatch.setattr(resources, "autoscaler_max", lambda: None)
    with pytest.raises(Unschedulable, match="no autoscaler"):
        check_schedulable(cfg(num_gpus_per_actor=1))
    monkeypatch.setattr(resources, "autoscaler_max", lambda: {"CPU": 64.0})  # node types without GPUs
    with pytest.raises(Unschedulable, match="autoscaler offers at most"):
        check_schedulable(cfg(num_gpus_per_actor=1))
    monkeypatch.setattr(resources, "autoscaler_max", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert "no node has a GPU" in check_schedulable(cfg(num_gpus_per_actor=1))
    monkeypatch.setattr(resources, "autoscaler_max", lambda: {})  # a joined cluster that does not say what it offers
    assert "if this cluster has no autoscaler" in check_schedulable(cfg(num_gpus_per_actor=1))
    assert check_schedulable(cfg()) is None  # what fits needs nothing


def test_only_a_joined_cluster_may_grow_without_saying(monkeypatch):
    monkeypatch.setattr(resources, "_reported_max", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resources.autoscaler_max() is None  # the run's own local cluster
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resources.autoscaler_max() == {}
    monkeypatch.setattr(resources, "_reported_max", lambda: {"GPU": 8})
    assert resources.autoscaler_max() == {"GPU": 8}


def test_the_wait_is_said_every_interval_until_the_resource_arrives(monkeypatch):
    arrivals = iter([[CPU2], [CPU2], [CPU2, GPU_NODE]])
    monkeypatch.setattr(resources, "cluster_nodes", lambda: next(arrivals))
    c = cfg(num_gpus_per_actor=1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with WaitingNotice(c, placement_problem([CPU2], c), interval_s=0.01) as notice:
            deadline = time.monotonic() + 10
            while notice.missing is not None and time.monotonic() < deadline:
                time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert notice.missing is None  # the GPU node came: the notice stopped by itself
    assert len(lines) == 3 and all(line.startswith("[vreason-batch] waiting for the cluster to grow: ") for line in lines)
