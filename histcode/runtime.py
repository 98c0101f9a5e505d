"""Where and how work runs: the device, reader processes and seeds, and the fail points that crash tests
use. One small module so every stage resolves them the same way (tiling's tissue mask, pretraining,
embedding, heads). torch is imported inside the functions that need it."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FAILPOINT_ENV = "HISTCODE_FAILPOINT"


def file_stamps(paths) -> tuple:
    """(mtime ns, size, inode) of each path, None where it does not exist: equal stamps mean nothing was written
    (a store and its journal files, polled by a long-lived reader to know when to read them again)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL (no cleanup, like a power cut or the OOM killer) when the environment
    names this point: ``HISTCODE_FAILPOINT=embed.committed``. The points sit where a crash is most awkward
    (after a commit to one store and before the next); tests use them to prove that a rerun repairs
    everything. ``name:enospc`` raises ``OSError(ENOSPC)`` there instead, as a disk that fills at that point
    would; ``name@3`` (or ``name:enospc@3``) waits for the third pass (the count lives in the variable, which
    each pass before it counts down). Unset, this is one dictionary lookup."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec or not spec.startswith(name):
        return
    point, _, nth = spec.partition("@")
    point, _, mode = point.partition(":")
    if point != name:
        return
    if nth.isdigit() and int(nth) > 1:
        os.environ[FAILPOINT_ENV] = f"{spec.partition('@')[0]}@{int(nth) - 1}"
        return
    if mode == "enospc":
        import errno

        raise OSError(errno.ENOSPC, f"No space left on device (fail point {name})")
    os.kill(os.getpid(), signal.SIGKILL)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU. Asking for 'cuda' without one is an error, not a fallback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """'auto': on a GPU, reader processes on all but one core (up to 8) hide slide reads behind the model; on
    a CPU the model and the readers share the same few cores, and on up to 4 cores the main process reading
    between steps is faster (benchmarks/pretrain.py measures both)."""
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 4 else min(4, cores // 4)


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step`` of a run seeded ``seed``: a resumed run draws exactly what it would have."""
    return (seed * 1_000_003 + step) % (2**63)


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int | None = None) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (default: the CPU count, at least 2) for the rest of the process,
    unless ``MALLOC_ARENA_MAX`` is set (the user's word wins). Lance reads on a pool of threads, each of which
    gets an arena of its own under glibc's default (8 per core) and keeps what it freed there, so a process
    that reads a large table chunk by chunk grows by the pool's fragmentation rather than by what it holds
    (benchmarks/store.py measures ``load_bags`` both ways: with glibc's default arenas its peak RSS grew 350 ->
    733 MB from 30k to 2M tiles, capped it stayed at 495-498 MB from 120k on). Entry points call this once at
    start (the CLI, the flows' command lines); returns whether the cap was set (False off glibc)."""
    import ctypes
    import ctypes.util

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, max(2, arenas or os.cpu_count() or 2)))
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator, its defaults
        return False
