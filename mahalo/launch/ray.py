"""Replicas on a Ray cluster: long-lived actors that load the models once; this process
schedules prompts onto them and writes.

    driver (this process)                          replicas (Ray actors: a GPU, or a CPU slice, each)
      check options, join or start the cluster       load every model once           (Replica.__init__)
      wait until every replica is ready        <--   ready()
      hand each replica prompts, one call each -->   answer(): the prompt joins the replica's engine
      (the least loaded first, up to its room)       (continuous batching over all it holds)
      answers as they finish                   <--   (result, replica id, when it was ready)
      the caller writes them (the only writer)

Balancing: a replica holds up to ``batch.max_prompts`` prompts decoding plus
``launcher.batch_size`` waiting in its engine's queue; the driver hands the next prompt to the
replica with the fewest in hand, so one that drew long answers takes fewer.

Faults: a replica that dies (its process or node lost, ``ray.kill``) or whose engine stops fails
the prompts it holds; each goes back to the front of the queue and is tried again at once on a
live replica (its models already loaded), up to ``launcher.max_attempts`` tries in all. Only the
dead replica is replaced (a new actor loads the models while the others go on). A prompt's own
fault (a reward model's NaN, a prompt too long) is its answer, a ``ValueError`` written as its
error record, and is never retried. Every prompt is handed back once.

Leftovers: a Ray instance this run starts is shut down when it ends; a driver killed outright
(``kill -9``) leaves Ray's helper processes behind, so a small reaper process
(:mod:`mahalo.launch.reaper`) watches the driver and kills them when it dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mahalo.app.config import LauncherConfig, RunConfig
from mahalo.engine.scheduler import device_limits
from mahalo.launch import Answers, Unanswered
from mahalo.result import GuidedResult

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 3600  # replicas must have loaded their models by then (an 8B pair from a slow disk)


def require_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ValueError: Ray is not installed.
    """
    try:
        import ray
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
    """The Ray instance a run uses; ``owned`` when the run started it (and shuts it down), with
    the reaper that cleans it up should this process be killed before it can."""

    ray: Any
    owned: bool
    cpus: float
    gpus: float
    reaper: subprocess.Popen | None = None

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
        if self.reaper is not None:  # Ray is down: nothing left to reap
            self.reaper.terminate()
            self.reaper.wait(timeout=10)
            self.reaper = None


def start_reaper() -> subprocess.Popen:
    """A process, in a session of its own (a signal to this process's group spares it), that
    kills the Ray processes this process started once it dies without shutting them down.

    ``kill -9`` of a driver takes its GCS and raylet down with it, but Ray's DashboardAgent and
    RuntimeEnvAgent (about 170 MB, deaf to SIGTERM) would live on until ``ray stop``.
    """
    reaper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")  # run as a file: no torch
    return subprocess.Popen([sys.executable, "-P", reaper, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


def connect(launcher: LauncherConfig) -> Cluster:
    """Join ``launcher.address`` (or the Ray instance this process already has, or start one on
    this machine) and check it can place every replica.

    Raises:
        ValueError: Ray missing, no cluster at the address, or fewer GPUs or CPUs than the
            replicas ask for.
    """
    ray = require_ray()
    owned, reaper = False, None
    if not ray.is_initialized():
        try:
            if launcher.address is None:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
                reaper = start_reaper()
            else:
                ray.init(address=launcher.address, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ValueError(
                f"could not join the Ray cluster at launcher.address={launcher.address} ({_first_line(err)}): "
                "start it with `ray start --head` on the head node, or remove launcher.address to start one here"
            ) from None
        owned = True
    resources = ray.cluster_resources()
    cluster = Cluster(ray, owned, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), reaper)
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
    """One replica (a Ray actor): the models, loaded once, and an engine that batches every
    prompt it holds. Its methods are coroutines, so it takes many ``answer`` calls at once, each
    waiting for its own prompt while the engine decodes all of them together."""

    def __init__(self, cfg: RunConfig, objectives: list[str]) -> None:
        import ray
        import torch

        from mahalo.app.build import load_engine

        t0 = time.time()
        torch.set_num_threads(max(1, int(cfg.launcher.cpus_per_replica)))
        self.engine = load_engine(cfg, objectives)
        self.name = ray.get_runtime_context().get_actor_id()
        self.started, self.loaded = t0, time.time()
        log.info("replica %s ready in %.1f s (pid %d)", self.name, self.loaded - t0, os.getpid())

    async def ready(self) -> tuple[str, float]:
        """(its actor id, when it had loaded the models): the driver hands it prompts from then."""
        return self.name, self.loaded

    async def answer(self, conversation: list[dict[str, str]]) -> GuidedResult | ValueError:
        """One prompt's answer. A prompt's own fault is its answer (a ValueError, written as its
        error record); only an engine that stopped (a bug, out of memory) raises, and the driver
        then retires this replica and tries the prompt on another."""
        return await asyncio.wrap_future(self.engine.submit(conversation))


@dataclass
class Answer:
    """One prompt's answer from a replica."""

    k: int  # position in the prompts handed to :func:`answer_many`
    result: GuidedResult | ValueError
    replica: str  # the Ray actor id of the replica that answered
    attempt: int  # the try that answered it (2 or more: a replica died, or its engine stopped, under it)
    ready: float  # when that replica had loaded its models (time.time())


@dataclass(eq=False)
class Live:
    """A replica that has loaded its models, and the calls it holds (object ref -> prompt)."""

    actor: Any
    name: str
    ready: float
    held: dict[Any, int] = field(default_factory=dict)


class Scheduler:
    """The driver's side: starts the replicas, hands each prompt to the least loaded live one,
    retries the prompts of a replica that died on the others, and replaces only that replica.

    One thread (the caller's) does everything; :meth:`run` yields answers as they arrive.
    """

    def __init__(self, ray: Any, cfg: RunConfig, objectives: list[str], prompts: list[Any]) -> None:
        launcher = cfg.launcher
        self.ray, self.cfg, self.objectives, self.prompts = ray, cfg, objectives, prompts
        self.room = replica_prompts(cfg) + launcher.batch_size  # decoding + queued in its engine
        self.actor_class = ray.remote(Replica).options(
            num_cpus=launcher.cpus_per_replica, num_gpus=launcher.gpus_per_replica,
            max_restarts=0,  # a dead replica is replaced by the driver, its prompts retried elsewhere at once
            max_concurrency=self.room + 8,
        )
        self.todo: deque[int] = deque(range(len(prompts)))
        self.tries = [0] * len(prompts)
        self.given_up: list[int] = []
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor
        self.live: list[Live] = []
        self.calls: dict[Any, Live] = {}  # answer() ref -> the replica holding it
        self.spares = launcher.replicas * launcher.max_attempts  # replacements allowed in all
        self.start_errors: list[str] = []
        self.answered = 0

    # -- replicas --------------------------------------------------------------------------

    def _start(self) -> None:
        actor = self.actor_class.remote(self.cfg, self.objectives)
        self.starting[actor.ready.remote()] = actor

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            name, ready = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            reason = _root_error(err)
            self.start_errors.append(reason)
            log.warning("a replica could not start (%s); it is not replaced", reason)
            return
        self.live.append(Live(actor, name, ready))

    def _retire(self, live: Live, reason: str) -> None:
        """``live`` died (or its engine stopped): its prompts go back first in the queue; a new
        replica takes its place while prompts remain."""
        if live not in self.live:
            return
        self.live.remove(live)
        self.ray.kill(live.actor)  # an engine that stopped: the actor may still run
        lost = sorted(live.held.values())
        for ref in live.held:
            self.calls.pop(ref, None)
        live.held.clear()
        retry = [k for k in lost if self.tries[k] < self.cfg.launcher.max_attempts]
        self.given_up += [k for k in lost if self.tries[k] >= self.cfg.launcher.max_attempts]
        self.todo.extendleft(reversed(retry))
        replace = bool(self.todo or self.calls) and self.spares > 0
        log.warning("replica %s lost (%s): %d prompts it held %s%s", live.name, reason, len(lost),
                    "go to the live replicas" if retry else "are out of tries",
                    "; starting a replacement" if replace else "")
        if replace:
            self.spares -= 1
            self._start()

    def close(self) -> None:
        """Kill every replica (a cluster the run joined keeps running)."""
        for actor in [*(r.actor for r in self.live), *self.starting.values()]:
            try:
                self.ray.kill(actor)
            except self.ray.exceptions.RayError:
                pass
        self.live.clear()
        self.starting.clear()
        self.calls.clear()

    # -- prompts ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self.todo:
            open_ = [r for r in self.live if len(r.held) < self.room]
            if not open_:
                return
            live = min(open_, key=lambda r: len(r.held))
            k = self.todo.popleft()
            self.tries[k] += 1
            ref = live.actor.answer.remote(self.prompts[k])
            live.held[ref] = k
            self.calls[ref] = live

    def _answered(self, ref: Any) -> Answer | None:
        live = self.calls.pop(ref)
        k = live.held.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:  # the replica's engine stopped under it
            live.held[ref] = k  # retried with the rest of what it held
            self._retire(live, f"its engine failed: {_root_error(err)}")
            return None
        except self.ray.exceptions.RayError as err:  # the replica's process, or its node, is gone
            live.held[ref] = k
            self._retire(live, _first_line(err))
            return None
        self.answered += 1
        return Answer(k, result, live.name, self.tries[k], live.ready)

    def _no_replica_left(self) -> Exception:
        reason = self.start_errors[-1] if self.start_errors else "none left alive"
        if not self.answered and self.start_errors:  # nothing answered, nothing written: bad input
            return ValueError(f"the replicas could not start: {reason}")
        return Unanswered(f"{len(self.todo) + len(self.given_up)} prompts unanswered: no replica is left "
                          f"({reason}): re-run the same command to retry them")

    def run(self) -> Iterator[Answer]:
        """Answers as they finish, each prompt's once.

        Raises:
            ValueError: no replica could start (nothing was answered).
            Unanswered: prompts out of tries, or no replica left; the answers yielded stand.
        """
        ray = self.ray
        for _ in range(self.cfg.launcher.replicas):
            self._start()
        # Every replica loaded before the first prompt goes out (else the first one ready takes
        # them all); a replacement joins whenever it is ready.
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=STARTUP_TIMEOUT_S)
        if len(ready) < self.cfg.launcher.replicas:
            raise Unanswered(
                f"the {self.cfg.launcher.replicas} replicas did not all start within {STARTUP_TIMEOUT_S} s (the "
                "cluster's resources are taken, or loading the models is stuck): check `ray status`, then re-run"
            )
        for ref in ready:
            self._started(ref)
        while self.todo or self.calls:
            self._dispatch()
            waiting = [*self.calls, *self.starting]
            if not self.calls and not self.live and not self.starting:
                raise self._no_replica_left()
            if not waiting:  # prompts queued, replicas live but full: cannot happen (room >= 1)
                raise RuntimeError("scheduler stalled")
            done, _ = ray.wait(waiting, num_returns=1)
            more, _ = ray.wait([r for r in waiting if r not in done], num_returns=len(waiting) - 1, timeout=0) \
                if len(waiting) > 1 else ([], None)
            for ref in [*done, *more]:
                if ref in self.starting:
                    self._started(ref)
                elif ref in self.calls:  # not dropped by a retire earlier in this loop
                    answer = self._answered(ref)
                    if answer is not None:
                        yield answer
        if self.given_up:
            raise Unanswered(
                f"{len(self.given_up)} prompts unanswered after launcher.max_attempts="
                f"{self.cfg.launcher.max_attempts} tries each (their replica died or its engine stopped each "
                "time; see the log above): re-run the same command to retry them"
            )


def answer_many(cfg: RunConfig, objectives: list[str], prompts: list[Any], cluster: Cluster) -> Iterator[Answer]:
    """Answer ``prompts`` on ``cluster``'s replicas; answers come back as they finish, each once.
    The replicas are killed when the answers end (or the caller stops reading).

    Raises:
        ValueError: the replicas could not start (nothing answered).
        Unanswered: prompts still unanswered after ``launcher.max_attempts`` tries each (their
            replicas died each time); the answers already yielded stand.
    """
    scheduler = Scheduler(cluster.ray, cfg, objectives, prompts)
    try:
        yield from scheduler.run()
    finally:
        scheduler.close()


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
