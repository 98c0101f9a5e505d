"""Start-up of the command line: wall time of `histcode --help` from each entry point, best and median of
several runs, beside a bare `python -c pass` in the same run (the interpreter's own start-up).

    python benchmarks/startup.py [--repeats 7]

The commands import their heavy libraries (torch, DuckDB, Lance, MLflow, Prefect) inside themselves, so asking
for help stays well under half a second.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(command: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "histcode --help": [str(Path(sys.executable).with_name("histcode")), "--help"],
        "python -m histcode --help": [sys.executable, "-m", "histcode", "--help"],
        "python -m histcode.cli pretrain --help": [sys.executable, "-m", "histcode.cli", "pretrain", "--help"],
    }
    base = None
    print(f"{'command':42s} {'best s':>8s} {'median s':>9s} {'median : python':>16s}")
    for name, command in commands.items():
        times = timed(command, args.repeats)
        median = statistics.median(times)
        base = base or median
        print(f"{name:42s} {min(times):8.3f} {median:9.3f} {median / base:13.2f} : 1")


if __name__ == "__main__":
    main()
