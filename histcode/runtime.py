"""Where and how work runs: the device, reader processes and seeds. One small module so every stage resolves
them the same way (tiling's tissue mask, pretraining, embedding, heads)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU. Asking for 'cuda' without one is an error, not a fallback."""
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
