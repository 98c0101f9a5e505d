"""One MLflow workspace per HistCode workspace on a shared tracking server.

A server started with ``--enable-workspaces`` (MLflow 3.10+) keeps experiments, runs, registered models, aliases
and artifacts apart per MLflow workspace; every request names its workspace in a header. ``ScopedClient`` wraps
an ``MlflowClient`` so that each call runs inside the HistCode workspace's MLflow workspace (the project name,
``Workspace.project``), created on first use. A server without workspaces keeps one namespace for everybody:
HistCode then says so once and carries on unscoped (two projects there should use different servers).

Errors of the server itself (connection refused, timeouts, 5xx after MLflow's retries) become
``ServiceUnavailable`` naming the server, so a stopped server is not reported as a fault of the data.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from histcode.errors import ServiceUnavailable

log = logging.getLogger(__name__)

UNREACHABLE = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out",
               "RemoteDisconnected", "NewConnectionError", "too many 50", "TEMPORARILY_UNAVAILABLE")


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow client error means the server did not answer (rather than refused the request)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in UNREACHABLE)


def service_error(uri: str, exc: BaseException) -> ServiceUnavailable:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ServiceUnavailable("MLflow tracking server", uri, first)


@contextmanager
def in_workspace(name: str | None) -> Iterator[None]:
    """MLflow's client calls inside the block go to workspace ``name`` (None: no workspace header)."""
    if name is None:
        yield
        return
    from mlflow.utils.workspace_context import WorkspaceContext

    with WorkspaceContext(name):
        yield


@contextmanager
def translated(uri: str) -> Iterator[None]:
    """A server that does not answer raises ``ServiceUnavailable`` naming it."""
    try:
        yield
    except ServiceUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 -- MLflow wraps transport errors in several types
        if unreachable(exc):
            raise service_error(uri, exc) from exc
        raise


class ScopedClient:
    """An ``MlflowClient`` whose every method runs in one MLflow workspace, with the server's outages named."""

    def __init__(self, client, uri: str, workspace: str | None) -> None:
        self._client, self._uri, self.workspace = client, uri, workspace

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with translated(self._uri), in_workspace(self.workspace):
                return attr(*args, **kwargs)

        return call


def open_workspace(client, uri: str, name: str) -> str | None:
    """``name`` on the server (created when missing), or None when the server has no workspaces."""
    from mlflow.exceptions import MlflowException

    with translated(uri):
        try:
            known = {w.name for w in client.list_workspaces()}
        except MlflowException as exc:
            if "workspace" not in str(exc).lower() or unreachable(exc):
                raise
            log.warning("the MLflow server at %s has no workspaces (start it with --enable-workspaces): this "
                        "workspace's runs and models share one namespace with every other user's", uri)
            return None
        if name not in known:
            try:
                client.create_workspace(name, description="a HistCode workspace")
            except MlflowException as exc:  # another process of the same workspace made it first
                if name not in {w.name for w in client.list_workspaces()}:
                    raise
                log.debug("workspace %s: %s", name, exc)
            log.info("MLflow workspace %s created on %s", name, uri)
    return name
