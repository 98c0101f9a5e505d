"""Service processes: started in a session of their own with their output in a log file, waited for until they
answer, and stopped (the whole process group: SIGTERM, then SIGKILL). Used by the local stack
(``histcode services``), `histcode serve` and the tests; nothing here knows which service it runs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service that did not start, stopped, or does not answer; the message names it and its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def tail(path: Path | None, chars: int = 2000) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    return text[-chars:]


def spawn(argv: list[str], env: dict[str, str], log_file: Path | None, cwd: Path | None = None) -> subprocess.Popen:
    """``argv`` in a new session (so that stopping it stops its children too), output appended to ``log_file``."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file is not None else subprocess.DEVNULL  # noqa: SIM115 -- the child keeps it
    try:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        if log_file is not None:
            out.close()


def wait_until(name: str, ready: Callable[[], bool], timeout: float = 120.0, process: subprocess.Popen | None = None,
               log_file: Path | None = None) -> None:
    """Poll ``ready`` until it answers True; a process that exits first, or the timeout, is a ``ServiceError``
    naming the service and quoting the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"{name} exited with code {process.returncode} while starting"
                               + (f"; its log {log_file} ends:\n{tail(log_file)}" if log_file else ""))
        if ready():
            return
        time.sleep(0.25)
    raise ServiceError(f"{name} did not answer within {timeout:.0f} s"
                       + (f"; its log {log_file} ends:\n{tail(log_file)}" if log_file else ""))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (a server run as an unprivileged user)
        return True
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop(pid: int, timeout: float = 20.0) -> bool:
    """SIGTERM to the process group led by ``pid`` (its session), SIGKILL after ``timeout``; True when it was
    running."""
    if not alive(pid):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap it when it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                pass
            if not alive(pid):
                return True
            time.sleep(0.1)
    return True


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """``stop`` for a process this one started (and reaps)."""
    if process.poll() is None:
        stop(process.pid, timeout)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("process %d did not exit", process.pid)
