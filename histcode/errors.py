"""Errors every layer may raise and every entry point reports the same way."""

from __future__ import annotations


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
