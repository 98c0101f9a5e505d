"""The one place that talks to MLflow.

Store: ``sqlite:///<workspace>/mlruns/mlflow.db`` with artifacts under ``<workspace>/mlruns/artifacts/<experiment>``
(MLflow 3 refuses the old file store); a copied or moved workspace's store is pointed at its own artifacts before
first use (``relocate``) by the commands that write; a reader that must not write (``Tracker(ws, read_only=True)``:
the viewer) reads a private relocated copy instead and leaves the workspace as it is. Runs are driven through an explicit ``MlflowClient``; only model logging needs MLflow's
active-run machinery, and that is confined to ``log_torch_model``. A registered encoder's weights are stored once:
its program is logged without the tensors its run's module holds, and ``load_model`` puts them back
(``ProgramWithoutWeights``, ``fill_weights``). A model is loaded only if it is laid out as HistCode logs one (a pt2
program, no pickle, no shipped code: ``model_files``), so a model planted in a copied workspace runs nothing. On a
tracking server (``$HISTCODE_MLFLOW_URI``) every call runs in the workspace's own MLflow workspace, and a server
that does not answer is named (``scope``).

Runs always end: ``Tracker.run`` ends a run FINISHED, FAILED on an exception, KILLED on Ctrl-C; every run is
tagged with the process that owns it, and a run whose process was killed outright is ended KILLED by the next
HistCode process that opens runs (``owners``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from histcode.tracking.owners import OWNER_TAG, end_dead_runs, owner_tag
from histcode.tracking.model_files import UnsafeModelError  # noqa: F401 -- raised by load_model, caught by callers
from histcode.tracking.model_files import check_model_folder, check_weights_reference, pickle_refused, refused_by_mlflow
from histcode.tracking.program_weights import WEIGHTS_METADATA, ModelWeightsError, ProgramWithoutWeights, fill_weights
from histcode.tracking.relocate import NoTrackingStore  # noqa: F401 -- raised by read-only trackers
from histcode.tracking.relocate import ReadOnlyStore, relocate_store
from histcode.tracking.scope import ScopedClient, in_workspace, open_workspace, translated
from histcode.workspace import REPO_ROOT, Workspace

log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
MAX_RUN_NAME = 120


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and tuples become comma-separated values ('attention,mean'), which
    read and filter better in MLflow's compare view than JSON lists."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


def git_commit(root: Path = REPO_ROOT) -> tuple[str | None, bool]:
    """(commit, dirty) of the code's repository, or (None, False) outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit.stdout.strip(), bool(status.stdout.strip())


def code_tags() -> dict[str, str]:
    commit, dirty = git_commit()
    tags = {"histcode.version": metadata.version("histcode")}
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["histcode.git_dirty"] = str(dirty).lower()
    return tags


def quote(value: str) -> str:
    """A string literal for an MLflow filter (``tags.x = {quote(v)}``), for values with quotes in them."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters and cannot be used in an MLflow filter")


class ReadOnlyTracker(RuntimeError):
    """A write asked of a tracker opened ``read_only``."""


class Tracker:
    """``read_only``: for readers that must leave the workspace as it is (the viewer): nothing is created (no
    ``mlruns/``, no store), a copied store is not relocated in place, and runs cannot be opened. A local store is
    then read through ``ReadOnlyStore``, a private relocated copy outside the workspace, so models of a copied
    workspace load from its own artifacts; a missing store is ``NoTrackingStore`` (a ``LookupError``)."""

    def __init__(self, ws: Workspace, *, read_only: bool = False) -> None:
        self.ws = ws
        self.read_only = read_only
        self._uri = ws.mlflow_uri
        self._client = None
        self._reader = None
        if read_only and ws.mlflow_is_local:
            self._reader = ReadOnlyStore(ws.mlruns_dir / "mlflow.db", self.artifact_root.as_uri())
        elif not read_only:
            ws.mlruns_dir.mkdir(parents=True, exist_ok=True)
        self._swept = False

    @property
    def uri(self) -> str:
        """The store MLflow is pointed at: the workspace's (or the server's), or a read-only tracker's private copy."""
        return self._reader.uri if self._reader is not None else self._uri

    @property
    def artifact_root(self) -> Path:
        return (self.ws.mlruns_dir / "artifacts").resolve()

    @property
    def client(self):
        from mlflow import MlflowClient

        uri = self.uri  # a read-only tracker's copy is taken again here when the store changed
        if self._client is None:
            if self._reader is not None:
                self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            elif self.ws.mlflow_is_local:
                relocate_store(self.ws.mlruns_dir / "mlflow.db", self.artifact_root.as_uri())
                self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            else:
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                self._client = ScopedClient(client, uri, open_workspace(client, uri, self.ws.project()))
        return self._client

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyTracker(f"cannot {what}: this tracker over {self.ws.root} was opened read-only")

    @property
    def mlflow_workspace(self) -> str | None:
        """The MLflow workspace this workspace's runs and models live in on a shared server (None: local store,
        or a server without workspaces)."""
        return getattr(self.client, "workspace", None)

    def end_dead_runs(self) -> list[str]:
        """KILLED for runs left RUNNING by processes of this host that died (kill -9, power loss)."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return end_dead_runs(self.client, ids)

    def end_dead_runs_once(self) -> None:
        """``end_dead_runs`` the first time this tracker opens or looks up runs."""
        if not self._swept:
            self._swept = True
            self.end_dead_runs()

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not self.ws.mlflow_is_local:  # a tracking server decides where artifacts go (its --artifacts-destination)
            return self.client.create_experiment(name)
        location = (self.artifact_root / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_run(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
                  parent: str | None = None) -> str:
        """A new RUNNING run owned by this process; prefer ``run``, which always ends it."""
        self._writable("open a run")
        self.end_dead_runs_once()
        extra = {"mlflow.parentRunId": parent} if parent else {}
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name[:MAX_RUN_NAME],
                                     tags={**code_tags(), **(tags or {}), **extra, OWNER_TAG: owner_tag()})
        return run.info.run_id

    def reopen_run(self, run_id: str) -> str:
        """Continue a run after a restart (a resumed training run stays one MLflow run); this process owns it."""
        self._writable("reopen a run")
        self.end_dead_runs_once()
        self.client.set_tag(run_id, OWNER_TAG, owner_tag())
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextmanager
    def closing(self, run_id: str) -> Iterator[str]:
        """End ``run_id`` when the block ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C or exit."""
        try:
            yield run_id
        except (KeyboardInterrupt, SystemExit):
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id)

    def run(self, experiment: str, run_name: str, tags: Mapping[str, str] | None = None, parent: str | None = None):
        """A new run for a ``with`` block, always ended (see ``closing``)."""
        return self.closing(self.start_run(experiment, run_name, tags, parent))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()]
        existing = self.client.get_run(run_id).data.params
        fresh = [p for p in flat if p.key not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(directory), artifact_path)

    def download_artifacts(self, run_id: str, artifact_path: str, destination: Path) -> Path:
        """A run's artifact (file or folder) copied under ``destination``; returns its local path."""
        destination.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(destination)))

    @contextmanager
    def _store(self) -> Iterator[None]:
        """Point MLflow's process-wide URIs at this workspace for the duration, then put them back."""
        import mlflow

        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            with translated(self.uri), in_workspace(self.mlflow_workspace):
                yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])

    @contextmanager
    def _active(self, run_id: str) -> Iterator[None]:
        import mlflow

        with self._store(), mlflow.start_run(run_id=run_id):
            yield

    def log_torch_model(self, run_id: str, model, name: str, input_shape: tuple[int, ...], output_dim: int | None,
                        registered_name: str | None = None, aliases: tuple[str, ...] = (),
                        version_tags: Mapping[str, Any] | None = None,
                        weights_artifact: str | None = None) -> tuple[str, str | None]:
        """Log an eval-mode module as a torch.export (pt2) model whose first dimension (batch, or tiles of a
        bag) is dynamic, optionally register it and point ``aliases`` at the new version. ``output_dim`` None:
        the model returns several tensors (heads: outputs and attention). ``weights_artifact``: the run's
        artifact that already holds ``model.state_dict()`` (``encoder_module/state.pt``, a registered encoder's
        module): the program is then logged without those tensors and ``load_model`` takes them from there, so
        the weights are stored once (``ProgramWithoutWeights``). Returns (model uri, version)."""
        import mlflow
        import numpy as np
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec

        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))])
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, output_dim))]) if output_dim else None
        signature = ModelSignature(inputs=inputs, outputs=outputs)
        example = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)  # batch > 1: dynamic batch
        common = dict(name=name, signature=signature, input_example=example, serialization_format="pt2",
                      pip_requirements=[f"torch=={metadata.version('torch')}"], registered_model_name=registered_name)
        with self._active(run_id):
            if weights_artifact is None:
                info = mlflow.pytorch.log_model(
                    model, **common,
                    # pyfunc serving expects one output tensor; heads return (outputs, attention), so serving-input
                    # validation would only warn. Loading them back with mlflow.pytorch is tested instead.
                    validate_serving_input=output_dim is not None,
                )
            else:
                self._require_artifact(run_id, weights_artifact)
                reference = {"run_id": run_id, "artifact": weights_artifact}
                info = Model.log(
                    artifact_path=None, flavor=ProgramWithoutWeights(set(model.state_dict())), flavor_name="pytorch",
                    pytorch_model=model, metadata={WEIGHTS_METADATA: reference},
                    validate_serving_input=False,  # ProgramWithoutWeights checks the program it saves instead
                    **common)
        version = None
        if registered_name:
            version = str(info.registered_model_version)
            for key, value in (version_tags or {}).items():  # tags first: an alias never points at a version half-tagged
                self.client.set_model_version_tag(registered_name, version, key, str(value))
            for alias in aliases:
                self.client.set_registered_model_alias(registered_name, alias, version)
        return info.model_uri, version

    def stored_bytes(self, name: str, version: str) -> dict[str, int]:
        """What a registered version keeps in the artifact store, in bytes: its run's artifacts (``run``: an
        encoder's module, reports) and its logged model (``model``: the program, MLmodel, input example)."""
        client = self.client

        def size(listing, path: str | None = None) -> int:
            return sum(size(listing, f.path) if f.is_dir else (f.file_size or 0) for f in listing(path))

        v = client.get_model_version(name, version)
        source = v.source or ""
        model_id = v.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
        return {"run": size(lambda p: client.list_artifacts(v.run_id, p)),
                "model": size(lambda p: client.list_logged_model_artifacts(model_id, p)) if model_id else 0}

    def _require_artifact(self, run_id: str, path: str) -> None:
        folder = path.rpartition("/")[0]
        if path not in {a.path for a in self.client.list_artifacts(run_id, folder or None)}:
            raise ValueError(f"run {run_id} has no artifact {path}: log the weights before the program that refers "
                             "to them")

    def load_model(self, uri: str):
        """A logged or registered torch model (``models:/name@alias``, ``models:/name/3``, ``runs:/...``). A
        program logged without its weights (``weights_artifact``) gets them from its run's state dict, read with
        ``weights_only`` and memory-mapped; versions logged with their weights inside load as they are.

        The downloaded folder is checked before MLflow reads it (``model_files.check_model_folder``: the pt2
        layout HistCode logs, no pickle, no shipped code) and loaded with MLflow's pickle refusal on, so a
        model planted in a shared workspace is refused (``UnsafeModelError``) and nothing of it runs."""
        import tempfile

        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        with self._store(), tempfile.TemporaryDirectory(prefix="histcode-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            check_model_folder(Path(local), uri)
            reference = (Model.load(local).metadata or {}).get(WEIGHTS_METADATA)
            if reference is not None:
                check_weights_reference(reference, uri)
            try:
                with pickle_refused():
                    model = mlflow.pytorch.load_model(local, map_location="cpu")
            except MlflowException as exc:
                refused = refused_by_mlflow(exc, uri)
                if refused is not None:
                    raise refused from exc
                raise
        if reference:
            fill_weights(model, self._weights(reference), f"{uri} (weights: run {reference['run_id']}, "
                                                          f"{reference['artifact']})")
        return model

    def _weights(self, reference: Mapping[str, str]) -> dict:
        """The state dict a program refers to, memory-mapped: read in place from a local store, from a
        downloaded copy (deleted at once; the mapping keeps it readable) from a tracking server."""
        import tempfile

        import torch

        run_id, artifact = reference["run_id"], reference["artifact"]
        try:
            if self.ws.mlflow_is_local:
                return torch.load(self.client.download_artifacts(run_id, artifact), map_location="cpu",
                                  weights_only=True, mmap=True)
            with tempfile.TemporaryDirectory(prefix="histcode-weights-") as tmp:
                path = self.client.download_artifacts(run_id, artifact, tmp)
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 -- MLflow and torch raise many types for a missing or bad file
            raise ModelWeightsError(f"the weights of this program are run {run_id}'s artifact {artifact}, which "
                                    f"cannot be read ({type(exc).__name__}: {exc}); was the run deleted?") from exc


def telemetry_off() -> None:
    """No network here for telemetry; callers that start MLflow in-process set this first."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
