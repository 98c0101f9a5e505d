"""Which process owns a RUNNING MLflow run, and whether it is still alive.

Every run HistCode opens is tagged ``histcode.owner = host:pid:start-ms`` (the process start time tells a
reused pid apart). A process killed with SIGKILL cannot end its runs; the next HistCode process that opens runs
on the same host finds the RUNNING runs whose owner is gone and ends them as KILLED, so no run stays RUNNING.
Runs owned by other hosts are left alone: only their own host can tell whether they are alive.
"""

from __future__ import annotations

import logging
import os
import socket

import psutil

log = logging.getLogger(__name__)

OWNER_TAG = "histcode.owner"
END_REASON_TAG = "histcode.end_reason"


def _start_ms(pid: int) -> int:
    return int(psutil.Process(pid).create_time() * 1000)


def owner_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ms(pid)}"


def owner_alive(tag: str) -> bool | None:
    """True / False for an owner on this host; None when the tag is malformed or names another host."""
    try:
        host, pid, start = tag.rsplit(":", 2)
        pid, start = int(pid), int(start)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(_start_ms(pid) - start) <= 10  # create_time is a float; allow rounding
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def end_dead_runs(client, experiment_ids: list[str]) -> list[str]:
    """End as KILLED every RUNNING run of ``experiment_ids`` whose owner process on this host has died.
    Returns their run ids."""
    if not experiment_ids:
        return []
    ended = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000):
        owner = run.data.tags.get(OWNER_TAG)
        if owner is None or owner_alive(owner) is not False:
            continue
        client.set_tag(run.info.run_id, END_REASON_TAG, f"its process ({owner}) died without ending it")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by a process that died: marked KILLED",
                    run.info.run_id, run.info.run_name)
        ended.append(run.info.run_id)
    return ended
