"""Errors every layer may raise and every entry point reports the same way."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class HistcodeError(Exception):
    """The base of every error HistCode raises for a user to read: an unknown view, a label set the gate did
    not pass, a refused query, an unreadable slide, a service that does not answer. Its message names the item
    and the reason (and, where there is one, the command that fixes it); the command line prints exactly that
    message. Each subclass also keeps its built-in base (``LookupError``, ``ValueError``, ``RuntimeError``), so
    ``except ValueError`` written against earlier versions still catches it."""


class UsageError(HistcodeError, ValueError):
    """An argument outside what a function takes (an unknown task, format or fold); the message lists what it
    takes."""


class MissingExtra(HistcodeError, ImportError):
    """An optional dependency that one feature needs is not installed; the message names the extra to install."""


def require(module: str, extra: str, feature: str):
    """``module`` imported, or MissingExtra naming ``pip install 'histcode[extra]'`` for ``feature``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{feature} needs {module}, which is not installed: pip install 'histcode[{extra}]'") from exc


class ServiceUnavailable(HistcodeError, RuntimeError):
    """A shared service (MLflow server, object storage, Dask scheduler, PostgreSQL) that does not answer: a
    fault of the machine or network, never of the data, so nothing is marked failed and a rerun carries on once
    it is back."""

    def __init__(self, service: str, address: str, detail: str) -> None:
        self.service, self.address, self.detail = service, address, detail
        super().__init__(f"the {service} at {address} does not answer ({detail}); nothing after the last "
                         f"completed step was committed: start it again (`histcode services up` for the local "
                         f"stack) and rerun, which carries on from there")


OBJECT_STORE_MARKERS = ("Generic S3 error", "error sending request", "dns error", "connection refused",
                        "Connection refused", "Could not connect to the endpoint URL", "EndpointConnectionError",
                        "ServiceUnavailable", "SlowDown", "503 Service Unavailable", 'store: "S3"', "RetryError")
DASK_MARKERS = ("Timed out trying to connect to tcp://", "CommClosedError", "Stream is closed")


def service_error_of(exc: BaseException) -> ServiceUnavailable | None:
    """``exc`` (or what caused it) as the outage of a named service, or None when it is not one. Object storage
    errors come from Lance (Rust's object_store) and boto3; Dask's from its comms."""
    import os

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ServiceUnavailable):
            return exc
        text = f"{type(exc).__name__}: {exc}"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if any(m in text for m in DASK_MARKERS):
            return ServiceUnavailable("Dask scheduler", os.environ.get("HISTCODE_DASK_ADDRESS", "its address"), first)
        if any(m in text for m in OBJECT_STORE_MARKERS) and ("s3" in text.lower() or "endpoint" in text.lower()
                                                              or "lance" in text.lower() or "refused" in text):
            where = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("HISTCODE_LANCEDB_URI") or "its endpoint"
            return ServiceUnavailable("object storage (S3)", where, first)
        exc = exc.__cause__ or exc.__context__
    return None


# -- faults of the machine ---------------------------------------------------------------------------------------
# An error of the machine (the disk is full, a device fails, the process ran out of files or memory) says nothing
# about the slide, file or label being processed: the item is "not attempted", nothing of it is committed, and a
# plain rerun retries it once the machine is fixed. Every other error of a step is the input's ("failed").

NOT_ATTEMPTED = "not attempted"  # an outcome: a machine fault stopped the step before the item was committed

MACHINE_FAULTS: dict[int, tuple[str, str]] = {  # errno -> (what happened, how to recover)
    errno.ENOSPC: ("no space left on device", "free space on that disk and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or have the quota raised) and rerun"),
    errno.EIO: ("input/output error (the disk or its connection failed)", "check the disk (`dmesg`, its mount) and rerun"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (`ulimit -n 4096`) or use fewer workers, and rerun"),
    errno.ENFILE: ("too many open files on the system", "close other programs' files or raise fs.file-max, and rerun"),
    errno.ENOMEM: ("out of memory", "free memory, or use fewer workers or a smaller batch size, and rerun"),
}
# How the same errors read once a library has turned them into text (Lance's Rust errors, DuckDB's IOException).
MACHINE_MARKERS: tuple[tuple[str, int], ...] = (
    ("no space left on device", errno.ENOSPC), ("os error 28)", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT), ("os error 122)", errno.EDQUOT),
    ("input/output error", errno.EIO), ("os error 5)", errno.EIO),
    ("too many open files", errno.EMFILE), ("os error 24)", errno.EMFILE),
    ("cannot allocate memory", errno.ENOMEM), ("os error 12)", errno.ENOMEM), ("out of memory error", errno.ENOMEM),
)


def machine_errno(fault: BaseException | str | None) -> int | None:
    """The errno (``MACHINE_FAULTS``) of a fault of the machine in ``fault`` (an exception, what caused it, or
    an error already told as text), or None when it is an error of the input or the code."""
    seen: set[int] = set()
    while fault is not None and id(fault) not in seen:
        seen.add(id(fault))
        if isinstance(fault, MachineFault):
            return fault.errno
        if isinstance(fault, MemoryError):
            return errno.ENOMEM
        if isinstance(fault, OSError) and fault.errno in MACHINE_FAULTS:
            return fault.errno
        text = (fault if isinstance(fault, str) else str(fault)).lower()
        found = next((code for marker, code in MACHINE_MARKERS if marker in text), None)
        if found is not None or isinstance(fault, str):
            return found
        fault = fault.__cause__ or fault.__context__
    return None


def is_machine_fault(fault: BaseException | str | None) -> bool:
    """Whether ``fault`` is the machine's (full disk, failing device, no file handles or memory left): the
    item it stopped is not attempted, and a plain rerun retries it."""
    return machine_errno(fault) is not None


class MachineFault(HistcodeError, RuntimeError):
    """A fault of the machine stopped a command: what happened, while doing what, what was kept, and how to
    recover (``no space left on device while writing ...; nothing was committed; free space and rerun``)."""

    def __init__(self, code: int, doing: str, kept: str = "nothing was committed", detail: str = "") -> None:
        self.errno, self.doing, self.kept, self.detail = code, doing, kept, detail
        what, recovery = MACHINE_FAULTS[code]
        said = f" ({detail})" if detail else ""
        super().__init__(f"{what} while {doing}{said}; {kept}; {recovery}")

    def __reduce__(self):  # raised in worker processes: pickled by its fields, not its message
        return MachineFault, (self.errno, self.doing, self.kept, self.detail)

    def keeping(self, kept: str) -> MachineFault:
        """The same fault, saying what the command kept (the items committed before it)."""
        return MachineFault(self.errno, self.doing, kept, self.detail)


def machine_fault(fault: BaseException | str, doing: str, kept: str = "nothing was committed") -> MachineFault | None:
    """``fault`` as a MachineFault naming ``doing`` and ``kept`` when it is the machine's, else None. One already
    told comes back as it is (``MachineFault.keeping`` says more about what was kept)."""
    if isinstance(fault, MachineFault):
        return fault
    code = machine_errno(fault)
    return None if code is None else MachineFault(code, doing, kept, _first_line(fault))


@contextmanager
def machine_faults_told(doing: str, kept: str | Callable[[], str] | None = None) -> Iterator[None]:
    """Inside, a fault of the machine leaves as a MachineFault saying ``doing`` (unless one already says what it
    was doing) and ``kept``, what the command keeps (a callable is asked once the fault happened); every other
    error passes as it is."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- only the machine's faults are told here
        fault = machine_fault(exc, doing)
        if fault is None:
            raise
        if kept is not None:
            fault = fault.keeping(kept() if callable(kept) else kept)
        if fault is exc:
            raise
        raise fault from exc


def _first_line(fault: BaseException | str) -> str:
    """The short form of the machine's own message: the file it names, without library internals."""
    import re

    if isinstance(fault, OSError) and fault.filename:
        return str(fault.filename)
    text = fault if isinstance(fault, str) else str(fault)
    files = re.findall(r'"(/[^"]+)"', text)  # DuckDB quotes the file; Lance's text names its own sources: not those
    return files[0] if files else ""
