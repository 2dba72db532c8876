"""launcher=ray: replicas on a local Ray (started here with num_cpus=2) write what the local
launcher writes; a replica killed while it holds prompts loses none, its prompts retried on the
live replica (no reload); a driver killed with kill -9 leaves no Ray process; bad options exit 2.

Ray's log monitor relays worker lines (``(Replica pid=N) ...``) to the driver's stderr late, into
whichever test captures it then: stderr checks drop them (:func:`_own_lines`), and the test
without Ray runs first."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="launcher=ray needs the ray extra (pip install 'mahalo[ray]')")

psutil = pytest.importorskip("psutil")  # the ray extra's, for the reaper

from mahalo import decode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = 12
# Tiny random models, 12 prompts; each prompt decodes several sentence steps of 3 candidates.
# MAHALO's best-of-N without a system turn (the launcher is under test, not the truth default): the
# tiny models' 1024-token context holds a prompt and 400 new tokens.
BASE = ["models=tiny", "+objective=truth", "search=step_best_of_n", "system_prompt=null", "search.max_new_tokens=64",
        "search.num_candidates=3", "search.seed=7"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    topics = ["the sky", "water", "cats", "Paris", "the moon", "bread", "rain", "music", "iron", "trees", "salt",
              "sleep"]
    path.write_text("".join(json.dumps({"prompt": f"Tell me about {t}.", "id": f"q{i}"}) + "\n"
                            for i, t in enumerate(topics)))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _by_index(path: Path) -> dict[int, dict]:
    records = _records(path)
    by = {r["index"]: r for r in records}
    assert len(by) == len(records), "an index was written twice"
    return by


RAY_LOG = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(\S+ pid=\d+(?:, ip=[\d.]+)?\)")  # Ray may colour the prefix


def _own_lines(err: str) -> str:
    """stderr less the lines Ray's log monitor relays from its workers (``(Name pid=N) ...``):
    they reach the driver late and land in whichever test captures stderr then."""
    return "\n".join(ln for ln in err.strip().splitlines() if not RAY_LOG.match(ln)).strip()


def test_without_ray_installed_exit_2_before_anything_loads(prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    from mahalo.launch import local

    monkeypatch.setattr(local, "load_guide", lambda *a: pytest.fail("models loaded"))
    out = tmp_path / "out.jsonl"
    assert decode.main([*BASE, f"prompts={prompts}", f"output={out}", "launcher=ray"]) == 2
    err = _own_lines(capsys.readouterr().err)
    assert err == "mahalo: error: launcher=ray needs Ray: pip install 'mahalo[ray]' (or use launcher=local)"
    assert not out.exists()


def test_ray_replicas_write_what_the_local_launcher_writes(cluster, prompts, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert decode.main([*BASE, f"prompts={prompts}", f"output={local}"]) == 0
    assert decode.main([*BASE, f"prompts={prompts}", f"output={remote}", "launcher=ray", "launcher.replicas=2",
                        "launcher.batch_size=1"]) == 0
    here, there = _by_index(local), _by_index(remote)
    assert sorted(there) == list(range(N))
    for i in range(N):
        assert there[i]["text"] == here[i]["text"], i
        assert there[i]["id"] == here[i]["id"] == f"q{i}"
        assert there[i]["scores"]["truth"] == pytest.approx(here[i]["scores"]["truth"], abs=1e-5)
        assert there[i]["attempt"] == 1
    assert len({r["replica"] for r in there.values()}) == 2  # both replicas took prompts


def _alive_replicas() -> list[str]:
    """Ids of the live replica actors (the GCS's actor table: no dashboard needed)."""
    actors = ray._private.state.actors().values()
    return [a["ActorID"] for a in actors if "Replica" in a["ActorClassName"] and a["State"] == "ALIVE"]


def _all_replicas() -> set[str]:
    """Ids of every replica actor the cluster has seen, live or dead."""
    return {a["ActorID"] for a in ray._private.state.actors().values() if "Replica" in a["ActorClassName"]}


def _kill_replica(actor_id: str) -> None:
    """``ray.kill`` on a replica: its handle comes from its id (Ray has no public lookup of an
    unnamed actor by id without the dashboard)."""
    from ray._raylet import ActorID

    handle = ray._private.worker.global_worker.core_worker.get_actor_handle(ActorID.from_hex(actor_id))
    ray.kill(handle)  # no_restart=True: the replica is gone for good


def test_a_replica_killed_while_it_holds_prompts_loses_none(cluster, prompts, tmp_path):
    """Its prompts are retried at once on the live replica (no reload); only the dead replica
    is replaced: three replicas load the models in all, not a fresh pool."""
    out = tmp_path / "ray.jsonl"
    killed: list[str] = []
    survivor: list[str] = []
    holding: list[bool] = []
    before = _all_replicas()

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and len(_alive_replicas()) < 2:  # both loaded: prompts go out now
            time.sleep(0.01)
        time.sleep(0.2)
        killed.append(_alive_replicas()[0])
        survivor.extend(r for r in _alive_replicas() if r != killed[0])
        holding.append(not out.exists() or not _records(out))  # no prompt has come back yet
        _kill_replica(killed[0])

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    # 6 prompts per replica (1 decoding, the rest queued in its engine): each is held for seconds.
    code = decode.main([*BASE, f"prompts={prompts}", f"output={out}", "launcher=ray", "launcher.replicas=2",
                        "launcher.batch_size=6", "batch.max_prompts=1", "search.max_new_tokens=400"])
    watcher.join(timeout=5)
    assert code == 0 and killed and holding == [True]
    records = _by_index(out)  # each index once
    assert sorted(records) == list(range(N))
    retried = [r for r in records.values() if r["attempt"] > 1]
    assert retried, "no prompt was held by the killed replica"
    assert all(r["replica"] != killed[0] and r["attempt"] == 2 for r in retried)
    assert not any(r["replica"] == killed[0] for r in records.values())  # what it held came back from another
    assert any(r["replica"] == survivor[0] for r in retried)  # retried at once where the models were loaded
    assert len(_all_replicas() - before) == 3  # the two, and one replacement for the dead one
    deadline = time.time() + 20
    while time.time() < deadline and _alive_replicas():
        time.sleep(0.1)
    assert _alive_replicas() == []  # the run's replicas are gone with it (the cluster stays)


@pytest.mark.parametrize("args, message", [
    (["launcher=ray", "launcher.replicas=0"], "launcher.replicas must be at least 1, got 0"),
    (["launcher.replicas=2"], "launcher.replicas applies to launcher=ray: add launcher=ray"),
    (["launcher=ray", "launcher.replicas=2", "launcher.gpus_per_replica=1"],
     "launcher.gpus_per_replica=1 but models.policy.device is 'cpu': set models.policy.device=cuda"),
    (["launcher=ray", "launcher.replicas=3", "launcher.gpus_per_replica=1", "models.policy.device=cuda",
      "models.rewards.truth.device=cuda"],
     "launcher asks for 3 replicas x 1 GPUs = 3 GPUs, but the Ray cluster has 0: lower launcher.replicas"),
    (["launcher=ray", "launcher.replicas=3"],
     "launcher asks for 3 replicas x 1 CPUs = 3 CPUs, but the Ray cluster has 2: lower launcher.replicas"),
    (["launcher=ray", "launcher.batch_size=0"], "launcher.batch_size must be at least 1"),
    (["launcher=ray", "launcher.max_passes=0"], "launcher.max_attempts must be at least 1, got 0"),  # the old name
    (["launcher=ray", "models.policy.kind=hf", "models.policy.path=/no/such/model"],
     "model path not found: /no/such/model"),  # replicas on this machine: checked here first
])
def test_bad_launcher_options_exit_2_with_one_line(cluster, prompts, tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    earlier = json.dumps({"index": 0, "prompt": "Tell me about the sky.", "text": "an earlier answer"}) + "\n"
    out.write_text(earlier)
    assert decode.main([*BASE, f"prompts={prompts}", f"output={out}", *args]) == 2
    err = _own_lines(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and err.startswith("mahalo: error: "), err
    assert message in err, err
    assert out.read_text() == earlier


def test_replicas_that_cannot_load_their_models_exit_2_and_write_nothing(cluster, prompts, tmp_path, capfd):
    """On a cluster (``launcher.address``) the model files are the nodes' own: a replica that
    cannot load them ends the run with the replica's own reason, before anything is written."""
    out = tmp_path / "out.jsonl"
    code = decode.main([*BASE, f"prompts={prompts}", f"output={out}", "launcher=ray", "launcher.address=auto",
                        "models.policy.kind=hf", "models.policy.path=/no/such/model"])
    assert code == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]  # after Ray's own log of the replica's death
    assert last == ("mahalo: error: the replicas could not start: model path not found: /no/such/model "
                    "(give a local directory or a hub id)")
    assert not out.exists()


def _below(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_killed_driver_leaves_no_ray_process_and_is_rerun_with_the_same_command(prompts, tmp_path):
    """The driver (its own local Ray) is SIGKILLed, alone, after its first records: every
    process it started (Ray's GCS, raylet, agents, replicas; and its reaper) is gone within
    seconds; the same command finishes the rest; every prompt is written once."""
    out = tmp_path / "ray.jsonl"
    cmd = [sys.executable, "-m", "mahalo.decode", *BASE, f"prompts={prompts}", f"output={out}", "launcher=ray",
           "launcher.replicas=2", "launcher.batch_size=1", "batch.max_prompts=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and _records(out)):
        time.sleep(0.05)
    started = _below(proc.pid)
    names = {p.name() for p in started}
    assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    assert any("reaper.py" in " ".join(p.cmdline()) for p in started)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone (kill -9 PID): what it started is orphaned
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and _running(started):
        time.sleep(0.2)
    assert _running(started) == []
    first = len(_records(out))
    assert 1 <= first < N
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming: {first} of {N} prompts already in" in done.stdout
    assert sorted(_by_index(out)) == list(range(N))
