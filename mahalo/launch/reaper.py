"""Kill the Ray processes a driver started once the driver dies without shutting them down.

``python -P mahalo/launch/reaper.py DRIVER_PID`` (run as a file, so it imports neither mahalo nor
torch; :func:`mahalo.launch.ray.start_reaper` starts it in a session of its own). While the
driver lives, it notes every Ray process below it (GCS, raylet, Ray's agents, workers) every
``INTERVAL_S``; when the driver is gone it kills those still running. The driver stops it
(SIGTERM) after its own ``ray.shutdown()``, so a run that ends normally reaps nothing.

Why: ``kill -9`` of the driver takes its GCS and raylet down, but Ray's DashboardAgent and
RuntimeEnvAgent (about 170 MB together, and deaf to SIGTERM) outlive it, reparented to init.
"""

from __future__ import annotations

import sys
import time

import psutil

INTERVAL_S = 0.5
RAY_NAMES = ("raylet", "gcs_server")


def is_ray(proc: psutil.Process) -> bool:
    """A process of Ray's: its daemons, its ``ray::`` agents and workers, its Python helpers."""
    try:
        name = proc.name()
        return name.startswith("ray::") or name in RAY_NAMES or any("/ray/" in a for a in proc.cmdline()[:3])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def watch(driver: psutil.Process) -> list[psutil.Process]:
    """Every Ray process seen below ``driver`` while it lived (returns when it dies)."""
    seen: dict[int, psutil.Process] = {}
    while not gone(driver):
        try:
            below = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in below:
            if proc.pid not in seen and is_ray(proc):
                seen[proc.pid] = proc  # remembers its start time: a reused pid is not this process
        time.sleep(INTERVAL_S)
    return list(seen.values())


def reap(procs: list[psutil.Process]) -> list[int]:
    """SIGKILL (Ray's agents ignore SIGTERM) every process of ``procs`` still running; the pids hit."""
    hit = []
    for proc in procs:
        try:
            if proc.is_running():  # False when the pid now names another process
                proc.kill()
                hit.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return hit


def main(argv: list[str]) -> int:
    try:
        driver = psutil.Process(int(argv[0]))
    except (IndexError, ValueError, psutil.NoSuchProcess):
        return 2
    reap(watch(driver))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
