"""Replicas on a Ray cluster: Ray Data feeds prompts to an actor pool; this process writes.

    driver (this process)                        replicas (Ray actors: a GPU, or a CPU slice, each)
      check options, join or start the cluster     load every model once          (Replica.__init__)
      ray.data.from_items(pending prompts)   -->   map_batches: each small batch joins the
                                                   replica's engine (continuous batching)
      iter_rows(): answers as they finish    <--   (index, pickled result, replica id)
      the caller writes them (the only writer)
      pass 2..max_passes: the prompts whose replica died for good

Balancing is Ray Data's: batches are small (``launcher.batch_size``) and an actor takes the next
one when it has room, so a replica that drew long answers takes fewer. A replica keeps up to
``batch.max_prompts`` prompts in flight by running several batches at once on one engine.

Faults are Ray's: a replica that crashes is restarted (``max_restarts=-1``) and its batches are
retried (``max_task_retries=-1``). A replica gone for good (``ray.kill``, restarts spent) fails
its batches; Ray Data carries on with the other replicas (``max_errored_blocks=-1``) and the
driver runs another pass over the prompts it did not get back. An index answered twice (a batch
retried after its first answer arrived) is handed on once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mahalo.app.config import LauncherConfig, RunConfig
from mahalo.engine.scheduler import device_limits
from mahalo.launch import Answers, Unanswered
from mahalo.result import GuidedResult

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 3600  # replicas must have loaded their models by then (an 8B pair from a slow disk)


def require_ray() -> Any:
    """The ``ray`` module, with Ray Data.

    Raises:
        ValueError: Ray is not installed.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("launcher=ray needs Ray: pip install 'mahalo[ray]' (or use launcher=local)") from None
    return ray


def check_models(cfg: RunConfig, objectives: list[str]) -> None:
    """GPU replicas need the models they load (the policy, the rewards of ``objectives``) on a GPU.

    Raises:
        ValueError: ``gpus_per_replica`` > 0 with a model left on the CPU, or > 1 without a
            device map to spread the models over the replica's GPUs.
    """
    launcher = cfg.launcher
    if launcher.gpus_per_replica <= 0:
        return
    named = [("models.policy", cfg.models.policy)]
    entries = {found[0] for found in map(cfg.models.provider, objectives) if found is not None}
    named += [(f"models.rewards.{k}", cfg.models.rewards[k]) for k in sorted(entries)]
    for where, model in named:
        if model.device == "cpu" and model.device_map is None:
            raise ValueError(
                f"launcher.gpus_per_replica={launcher.gpus_per_replica:g} but {where}.device is 'cpu': "
                f"set {where}.device=cuda (or device_map=auto)"
            )
    if launcher.gpus_per_replica > 1 and all(m.device_map is None for _, m in named):
        raise ValueError(
            f"launcher.gpus_per_replica={launcher.gpus_per_replica:g} needs a model spread over the GPUs: set "
            "models.policy.device_map=auto (and the reward models'), or use 1 GPU per replica"
        )


@dataclass
class Cluster:
    """The Ray instance a run uses; ``owned`` when the run started it (and shuts it down)."""

    ray: Any
    owned: bool
    cpus: float
    gpus: float

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def connect(launcher: LauncherConfig) -> Cluster:
    """Join ``launcher.address`` (or the Ray instance this process already has, or start one on
    this machine) and check it can place every replica.

    Raises:
        ValueError: Ray missing, no cluster at the address, or fewer GPUs or CPUs than the
            replicas ask for.
    """
    ray = require_ray()
    owned = False
    if not ray.is_initialized():
        try:
            if launcher.address is None:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=launcher.address, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ValueError(
                f"could not join the Ray cluster at launcher.address={launcher.address} ({_first_line(err)}): "
                "start it with `ray start --head` on the head node, or remove launcher.address to start one here"
            ) from None
        owned = True
    resources = ray.cluster_resources()
    cluster = Cluster(ray, owned, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
    try:
        _check_fits(launcher, cluster)
    except ValueError:
        cluster.close()
        raise
    return cluster


def _check_fits(launcher: LauncherConfig, cluster: Cluster) -> None:
    for kind, each, have in (("GPU", launcher.gpus_per_replica, cluster.gpus),
                             ("CPU", launcher.cpus_per_replica, cluster.cpus)):
        need = launcher.replicas * each
        if need > have + 1e-9:
            raise ValueError(
                f"launcher asks for {launcher.replicas} replicas x {each:g} {kind}s = {need:g} {kind}s, but the Ray "
                f"cluster has {have:g}: lower launcher.replicas or launcher.{kind.lower()}s_per_replica"
            )


def replica_prompts(cfg: RunConfig) -> int:
    """Prompts a replica keeps in flight: ``batch.max_prompts``, or its device's default (the
    scheduler's rule)."""
    device = "cuda" if cfg.launcher.gpus_per_replica > 0 else "cpu"
    return device_limits(device, cfg.engine.step_barrier, cfg.batch.max_prompts, cfg.batch.max_rows)[0]


class Replica:
    """One replica: the models, loaded once, and an engine that batches every prompt it holds.

    Ray Data calls it with batches ``{"k": (n,), "prompt": (n,)}``, several at once (threads);
    each batch waits for its own answers while the engine decodes all of them together.
    """

    def __init__(self, cfg: RunConfig, objectives: list[str]) -> None:
        import ray
        import torch

        from mahalo.app.build import load_engine

        t0 = time.time()
        torch.set_num_threads(max(1, int(cfg.launcher.cpus_per_replica)))
        self.engine = load_engine(cfg, objectives)
        self.name = ray.get_runtime_context().get_actor_id()
        self.started, self.ready = t0, time.time()
        log.info("replica %s ready in %.1f s (pid %d)", self.name, self.ready - t0, os.getpid())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        # A prompt's own fault is its answer (a ValueError, written as its error record); only an
        # engine that stopped (a bug, out of memory) fails the batch, which the next pass retries.
        futures = [self.engine.submit(json.loads(str(p))) for p in batch["prompt"]]
        answers = [pickle.dumps(f.result()) for f in futures]
        return {
            "k": batch["k"],
            "answer": np.array(answers, dtype=object),
            "replica": np.array([self.name] * len(answers), dtype=object),
            "ready": np.array([self.ready] * len(answers)),
        }


@dataclass
class Answer:
    """One prompt's answer from a replica."""

    k: int  # position in the prompts handed to :func:`answer_many`
    result: GuidedResult | ValueError
    replica: str  # the Ray actor id of the replica that answered
    attempt: int  # the pass that answered it (2 or more: its first replica died)
    ready: float  # when that replica had loaded its models (time.time())


def answer_many(cfg: RunConfig, objectives: list[str], prompts: list[Any], cluster: Cluster) -> Iterator[Answer]:
    """Answer ``prompts`` on ``cluster``'s replicas; answers come back as they finish, each once.

    Raises:
        Unanswered: prompts still unanswered after ``launcher.max_passes`` passes (their
            replicas died each time); the answers already yielded stand.
    """
    ray = cluster.ray
    launcher = cfg.launcher
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = -1  # a batch whose replica died for good: carry on, rerun it next pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    per_actor = math.ceil(replica_prompts(cfg) / launcher.batch_size)
    remaining = dict(enumerate(prompts))
    for attempt in range(1, launcher.max_passes + 1):
        rows = [{"k": k, "prompt": json.dumps(p)} for k, p in sorted(remaining.items())]  # conversations as JSON
        batches = math.ceil(len(rows) / launcher.batch_size)
        # First pass: every replica loaded before the first batch goes out (else the first one ready
        # takes them all). A retry pass takes the replicas as they come: the last pass's may still
        # be releasing their GPUs.
        context.wait_for_min_actors_s = STARTUP_TIMEOUT_S if attempt == 1 else -1
        data = ray.data.from_items(rows, override_num_blocks=batches)
        answered = data.map_batches(
            Replica,
            fn_constructor_kwargs={"cfg": cfg, "objectives": objectives},
            batch_size=launcher.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=min(launcher.replicas, batches),
                max_tasks_in_flight_per_actor=per_actor,
                max_concurrent_calls_per_actor=per_actor,
                enable_true_multi_threading=True,
            ),
            num_cpus=launcher.cpus_per_replica,
            num_gpus=launcher.gpus_per_replica,
            zero_copy_batch=False,
        )
        try:
            for row in answered.iter_rows():
                k = int(row["k"])
                if remaining.pop(k, None) is None:
                    continue  # answered already (a batch retried after its answers arrived)
                yield Answer(k, pickle.loads(row["answer"]), str(row["replica"]), attempt, float(row["ready"]))
        except ray.exceptions.GetTimeoutError:
            raise Unanswered(
                f"the {launcher.replicas} replicas did not all start within {STARTUP_TIMEOUT_S} s (the cluster's "
                "resources are taken, or loading the models is stuck): check `ray status`, then re-run"
            ) from None
        except ray.exceptions.RayError as err:  # replicas that cannot start (a model missing on a node)
            reason = _root_error(err)
            if len(remaining) == len(prompts):  # nothing answered, nothing written: bad input
                raise ValueError(f"the replicas could not start: {reason}") from None
            raise Unanswered(f"{len(remaining)} prompts unanswered: the replicas failed ({reason})") from None
        if not remaining:
            return
        log.warning("pass %d: %d prompts came back unanswered (their replica died or its engine stopped: see Ray's "
                    "log above); %s", attempt, len(remaining),
                    "retrying them" if attempt < launcher.max_passes else "giving up")
    raise Unanswered(
        f"{len(remaining)} prompts still unanswered after launcher.max_passes={launcher.max_passes} passes "
        "(their replica died or its engine stopped each time; see Ray's log above): re-run the same command to "
        "retry them"
    )


def answers(cfg: RunConfig, objectives: list[str], prompts: list[Any], console: Any) -> Answers:
    """``launcher=ray``: join the cluster and check the options now (exit 2 on bad ones); the
    replicas load the models. Each answer carries its ``replica`` and ``attempt``."""
    from mahalo.app.registry import check_sources

    require_ray()
    check_models(cfg, objectives)
    if cfg.launcher.address is None:  # the replicas will run here: their model files must exist here
        check_sources(cfg.models, objectives)
    t0 = time.perf_counter()
    cluster = connect(cfg.launcher)
    lc = cfg.launcher
    console.print(
        f"ray: {lc.replicas} replicas x ({lc.cpus_per_replica:g} CPU, {lc.gpus_per_replica:g} GPU) on a cluster of "
        f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs (joined in {time.perf_counter() - t0:.1f} s)", style="dim",
    )

    def stream() -> Answers:
        try:
            for a in answer_many(cfg, objectives, prompts, cluster):
                yield a.k, a.result, {"replica": a.replica, "attempt": a.attempt}
        finally:
            cluster.close()

    return stream()


def _root_error(err: BaseException) -> str:
    """The original error inside a Ray error (the last ``SomethingError: message`` line)."""
    found = re.findall(r"^\s*(?:\w+\.)*(\w*(?:Error|Exception)): (.+)$", str(err), flags=re.MULTILINE)
    if not found:
        return _first_line(err)
    kind, message = found[-1]
    return message if kind == "ValueError" else f"{kind}: {message}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
