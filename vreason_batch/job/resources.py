"""Whether the cluster can place a run's stages: checked before any work, and said while waiting for them.

A run needs `runtime.num_actors` model actors (each `runtime.num_cpus_per_actor` CPUs and
`runtime.num_gpus_per_actor` GPUs) and a CPU left over for a video task. Ray Data would wait for
them forever, printing only its `pending: 1 CPU, 1 GPU` line. So the driver packs them onto the
nodes' resources first: on a cluster that cannot grow (the local cluster a run starts for
itself, or one whose autoscaler's node types do not offer what is missing) a run that cannot be
placed exits before any work, naming the resource and the config key; on a cluster that may grow
(an autoscaler can add it, or a joined cluster whose autoscaler does not say what it offers), the
driver says what it waits for, every progress interval, until it arrives.
"""

from __future__ import annotations

import threading
from typing import Any

from vreason_batch.config import Config, ConfigError


class Unschedulable(ConfigError):
    """The run's stages cannot all be placed on this cluster, and it cannot grow to place them."""


def stage_needs(cfg: Config) -> tuple[dict[str, float], int, dict[str, float]]:
    """(one model actor's resources, how many actors the run needs to start, one video task's resources)."""
    rt = cfg.runtime
    actor = {"CPU": float(rt.num_cpus_per_actor)}
    if rt.num_gpus_per_actor:
        actor["GPU"] = float(rt.num_gpus_per_actor)
    return actor, rt.actor_pool[0], {"CPU": 1.0}  # an autoscaling pool starts with its min


def _fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in need.items())


def _take(free: dict[str, float], need: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _describe(nodes: list[dict[str, float]]) -> str:
    def one(n: dict[str, float]) -> str:
        return ", ".join(f"{n.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k == "CPU" or n.get(k))

    return "; ".join(f"node {i}: {one(n)}" for i, n in enumerate(nodes)) or "no nodes"


def placement_problem(nodes: list[dict[str, float]], cfg: Config) -> str | None:
    """Why the run's stages do not fit these nodes' resources (None: they do), naming the config keys."""
    actor, n_actors, video = stage_needs(cfg)
    free = [dict(n) for n in nodes]
    placed = 0
    for _ in range(n_actors):
        node = next((f for f in free if _fits(f, actor)), None)
        if node is None:
            break
        _take(node, actor)
        placed += 1
    rt, have = cfg.runtime, _describe(nodes)
    if placed == 0:
        if "GPU" in actor and not any(n.get("GPU") for n in nodes):
            return (f"a model actor asks for {actor['GPU']:g} GPU (runtime.num_gpus_per_actor) and no node has a GPU "
                    f"({have}); to run on CPU set runtime.num_gpus_per_actor=0 and model.device=cpu")
        return (f"no node can hold one model actor ({actor['CPU']:g} CPU, runtime.num_cpus_per_actor"
                + (f"; {actor['GPU']:g} GPU, runtime.num_gpus_per_actor" if "GPU" in actor else "") + f"): {have}")
    if placed < n_actors:
        which = (f"runtime.num_actors={n_actors}" if isinstance(rt.num_actors, int)
                 else f"the {n_actors} runtime.num_actors={rt.num_actors} starts with")
        return (f"only {placed} of {which} model actors fit ({actor['CPU']:g} CPU"
                + (f" and {actor['GPU']:g} GPU" if "GPU" in actor else "") + f" each): {have}; lower runtime.num_actors")
    if not any(_fits(f, video) for f in free):
        return (f"the {n_actors} model actor(s) take every CPU ({actor['CPU']:g} each, runtime.num_cpus_per_actor; "
                f"{have}) and leave none for the video stage, which needs 1; lower runtime.num_cpus_per_actor "
                f"(now {rt.num_cpus_per_actor:g}) or runtime.num_actors")
    return None


def cluster_nodes() -> list[dict[str, float]]:
    """Each live node's resources (totals: nothing of this run is placed yet)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def autoscaler_max() -> dict[str, float] | None:
    """What the cluster could grow to: the autoscaler's node types summed (a v2 autoscaler reports
    them to the GCS), {} for a cluster that may grow but does not say (joined through RAY_ADDRESS:
    KubeRay's and the cluster launcher's v1 autoscaler report nothing one can read), or None for a
    cluster that cannot grow (the local one a run starts for itself)."""
    import os

    found = _reported_max()
    if found:
        return dict(found)
    return {} if os.environ.get("RAY_ADDRESS") else None


def _reported_max() -> dict[str, float] | None:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no such report
        return None


def check_schedulable(cfg: Config) -> str | None:
    """Raise Unschedulable if the run cannot be placed and the cluster cannot grow; return what is
    missing when an autoscaler may add it (None: it fits now)."""
    problem = placement_problem(cluster_nodes(), cfg)
    if problem is None:
        return None
    grow = autoscaler_max()
    if grow == {}:
        return f"{problem} (if this cluster has no autoscaler, nothing will arrive: stop the run and change the key)"
    if grow is not None and placement_problem([grow], cfg) is None:
        return problem  # the autoscaler's node types can hold it: wait, and say so
    raise Unschedulable(f"this cluster cannot run the job: {problem} (the cluster cannot grow: "
                        + ("no autoscaler" if grow is None else f"its autoscaler offers at most {_describe([grow])}") + ")")


class WaitingNotice:
    """While the run's stages do not fit, print what the driver waits for every `interval_s` seconds."""

    def __init__(self, cfg: Config, missing: str, interval_s: float) -> None:
        self.cfg, self.missing, self.interval_s = cfg, missing, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vreason-waiting-notice", daemon=True)

    def __enter__(self) -> "WaitingNotice":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while self.missing is not None:
            print(f"[vreason-batch] waiting for the cluster to grow: {self.missing}", flush=True)
            if self.stop.wait(self.interval_s):
                return
            try:
                self.missing = placement_problem(cluster_nodes(), self.cfg)
            except Exception:  # noqa: BLE001 - a notice only; never fail the run over it
                return
