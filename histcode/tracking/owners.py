"""Which process owns a RUNNING MLflow run, and whether it is still alive.

Every run HistCode opens is tagged ``histcode.owner = machine:pid:start`` (machine = host, boot and pid
namespace; the process's start tells a reused pid apart). A process killed with SIGKILL cannot end its runs; the next HistCode process that opens runs
on the same host finds the RUNNING runs whose owner is gone and ends them as KILLED, so no run stays RUNNING.
Runs owned by other hosts are left alone: only their own host can tell whether they are alive.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

OWNER_TAG = "histcode.owner"
END_REASON_TAG = "histcode.end_reason"


def _machine() -> str:
    """This host, boot and pid namespace: pids are only comparable within one (a container that shares the
    host's network but not its pids has a namespace of its own)."""
    host = socket.gethostname()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        namespace = "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:  # not Linux
        return host
    return f"{host}/{boot}/{namespace}"


def _started(pid: int) -> str:
    """When a process started, as a key a reused pid does not repeat: on Linux its start in clock ticks since
    boot (unmoved by clock steps); elsewhere its start time in milliseconds."""
    if Path("/proc/self/stat").exists():  # Linux; a process that is gone raises FileNotFoundError
        return "t" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    return "m" + str(int(psutil.Process(pid).create_time() * 1000))


def owner_tag() -> str:
    return f"{_machine()}:{os.getpid()}:{_started(os.getpid())}"


def owner_alive(tag: str) -> bool | None:
    """True / False for an owner on this machine; None when the tag is malformed or names another machine,
    boot or pid namespace (only that one can tell)."""
    try:
        machine, pid, start = tag.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return None
    if machine != _machine():
        return None
    try:
        now = _started(pid)
    except (OSError, IndexError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if now[0] == "m" and start[0] == "m":
        return abs(int(now[1:]) - int(start[1:])) <= 2000
    return now == start


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
