"""A workspace from Python: its configuration, cohorts and slides, feature views, SQL, labels and their gate,
folds, registered heads and predictions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from histcode.api.frames import Format, check_format, convert
from histcode.errors import HistcodeError, UsageError
from histcode.api.view import View
from histcode.config import HistcodeConfig
from histcode.features.registry import ViewError, encoder_view, list_views, resolve_view
from histcode.heads.names import MODEL_NAMES
from histcode.store.catalog import Catalog, CatalogError
from histcode.store.patient_predictions import COLUMNS as PATIENT_PREDICTION_COLUMNS, CURRENT_PATIENT_SQL
from histcode.store.predictions import COLUMNS as PREDICTION_COLUMNS, CURRENT_SQL
from histcode.store.sql import SqlLimits
from histcode.tracking import Tracker, telemetry_off
from histcode.workspace import Workspace as Paths

HEAD_TAGS = ("aggregator", "view_id", "encoder_uri", "method", "label_version", "cv_score")


@dataclass(frozen=True)
class Labels:
    """The current label set: its version, where it came from, the gate's verdict (``passed``, ``status`` one of
    pending / passed / failed, and the failures' messages) and the slides' labels (``slides``: slide_id,
    patient_id, tumor, subtype, source)."""

    version: str
    status: str
    source: str | None
    n_samples: int
    n_genes: int
    n_patients: int
    failures: list[str] = field(default_factory=list)
    slides: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    _row: dict = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        """Whether the gate passed this label set (heads, folds and bags need it to)."""
        return self.status == "passed"

    def require_passed(self) -> Labels:
        """This label set when its gate passed; ``LabelGateError`` with the command line's message otherwise."""
        from histcode.labels.run import gate_refusal

        refusal = gate_refusal(self._row)
        if refusal is not None:
            raise refusal
        return self


@dataclass(frozen=True)
class Workspace:
    """One HistCode workspace (a folder holding ``params.yaml``, the catalog, the vector tables and the MLflow
    store). Open one with ``histcode.open``. Reading never writes to the stores."""

    _paths: Paths

    @property
    def root(self) -> Path:
        """The workspace's folder."""
        return self._paths.root

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking (and registry) URI of the workspace: its SQLite store, or ``$HISTCODE_MLFLOW_URI``;
        ``mlflow.set_tracking_uri(ws.mlflow_uri)`` logs a run of one's own beside HistCode's."""
        return self._paths.mlflow_uri

    @property
    def config(self) -> HistcodeConfig:
        """``params.yaml`` of the workspace, validated (the built-in defaults where it has none)."""
        return self._paths.config()

    def _catalog(self) -> Catalog:
        catalog = Catalog.of(self._paths)
        if not catalog.path.exists():
            raise CatalogError(f"no catalog at {catalog.path}: run `histcode ingest` (or `histcode demo`) first")
        return catalog

    # -- cohorts and slides -----------------------------------------------------------------------------
    def cohorts(self) -> pd.DataFrame:
        """One row per cohort: ``cohort``, ``role`` (training or inference), ``slides`` and ``ok`` (healthy)."""
        rows = self._catalog().cohort_counts()
        return pd.DataFrame(rows, columns=["cohort", "role", "slides", "ok"])

    def slides(self, cohort: str | None = None, status: str | None = None) -> pd.DataFrame:
        """The catalog's slides, one row each (``slide_id``, ``patient_id``, ``cohort``, ``status``, ``path``,
        ``vendor``, size, scale, ``attributes`` as a dict, ``reason`` for a failed slide)."""
        rows = self._catalog().slides(status)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        if cohort is not None:
            frame = frame[frame.cohort == cohort].reset_index(drop=True)
        frame["attributes"] = [json.loads(a) if isinstance(a, str) and a else {} for a in frame.attributes]
        return frame

    # -- feature views ----------------------------------------------------------------------------------
    def views(self) -> pd.DataFrame:
        """Every feature view: ``view_id``, the encoder (``encoder_uri``, ``model_name``, ``model_version``,
        ``method``), ``dim``, ``spec_id``, ``status`` (ok, partial, empty), ``updated_at``, and ``default``
        (the view commands read when none is named)."""
        rows = list_views(self._catalog())
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        try:
            default = resolve_view(self._catalog(), Tracker(self._paths), self.config).view_id
        except ViewError:
            default = None
        frame["default"] = frame.view_id == default
        keep = ["view_id", "encoder_uri", "model_name", "model_version", "method", "dim", "spec_id", "image_px",
                "status", "updated_at", "default"]
        return frame[keep]

    def view(self, ref: str | None = None) -> View:
        """A feature view: ``None`` the default (``features.encoder``'s view under the current tiling, what
        commands read), ``"fv-..."`` a view id, ``"@adco"`` the view of the encoder registered with that alias
        (``@moco``, ``@simclr``, ``@random``, a foundation encoder's alias such as ``@uni``), or an encoder
        reference ``name@alias`` / ``name/3``. ``ViewError`` names the views there are."""
        telemetry_off()
        catalog, cfg, tracker = self._catalog(), self.config, Tracker(self._paths)
        if ref is None or ref.startswith("fv-"):
            fv = resolve_view(catalog, tracker, cfg, ref)
        else:
            fv = encoder_view(catalog, tracker, cfg, self._encoder(ref))
        return View(self._paths, cfg, fv)

    def _encoder(self, ref: str) -> str:
        """An encoder reference with ``@alias`` read as an alias of the workspace's encoders
        (``pretrain.register_as``)."""
        return f"{self.config.pretrain.register_as}{ref}" if ref.startswith("@") else ref

    # -- SQL ----------------------------------------------------------------------------------------------
    def sql(self, query: str, *, view: str | None = None, format: Format = "pandas", limits: SqlLimits | None = None):
        """One read-only query (SELECT, EXPLAIN) over the catalog's tables and every view's Lance tables, as
        ``histcode sql`` runs it: ``tile_embeddings`` / ``slide_embeddings`` are the tables of ``view`` (a view
        as ``Workspace.view`` takes it; default the default view, when it is materialised). A pandas DataFrame,
        a pyarrow Table or a polars DataFrame (``format``). ``ReadOnlyQueryError`` for anything that writes,
        ``QueryError`` with DuckDB's message for a query it refuses; ``limits``: the time, memory and threads it may
        use (``SqlLimits``; default 30 s, 4 GB), past which it is interrupted with ``QueryLimitError``."""
        from histcode.store.sql import check_read_only, run_sql

        check_format(format)
        check_read_only(query)
        default = None
        if view is not None:
            default = self.view(view).view_id
        elif "_embeddings" in query:
            try:
                default = self.view().view_id
            except ViewError:
                default = None  # the query names tile_embeddings: DuckDB says it does not exist
        return convert(run_sql(self._paths, query, default, limits), format)

    # -- labels, folds and heads --------------------------------------------------------------------------
    def labels(self) -> Labels | None:
        """The current label set and its gate verdict, or None before `histcode labels ingest`."""
        from histcode.labels.run import current_label_set

        catalog = self._catalog()
        current = current_label_set(catalog)
        if current is None:
            return None
        failures = [f["message"] for f in json.loads(current["gate_failures"] or "[]")]  # as the gate stored them
        slides = pd.DataFrame(catalog.query("SELECT * FROM slide_labels ORDER BY slide_id"))
        return Labels(current["label_version"], current["gate_status"], current["source"], int(current["n_samples"] or 0),
                      int(current["n_genes"] or 0), int(current["n_patients"] or 0), failures, slides, current)

    def folds(self, task: str) -> pd.DataFrame:
        """The patient folds `histcode heads` cross-validates ``task`` over (``tumor``, ``subtype``, ``de``): one
        row per labelled slide with ``slide_id``, ``patient_id``, ``fold`` and, for a classification task,
        ``label`` and its class id ``target``. A patient's slides always share a fold. Needs a label set that
        passed the gate (``LabelGateError`` otherwise). The heads use the rows whose slides have vectors in
        their view (``View.bags`` gives exactly those)."""
        from histcode.heads.tasks import TASKS, ClassTask
        from histcode.labels.run import require_passed_gate

        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        catalog = self._catalog()
        require_passed_gate(catalog)
        folds = pd.DataFrame(catalog.query("SELECT slide_id, patient_id, fold FROM cv_folds"),
                             columns=["slide_id", "patient_id", "fold"])
        kind = TASKS[task]
        if isinstance(kind, ClassTask):
            labels = pd.DataFrame(catalog.query("SELECT * FROM slide_labels"))
            frame, classes, y = kind.labelled(labels[labels.slide_id.isin(folds.slide_id)])
            out = frame[["slide_id"]].assign(target=y, label=[classes[int(t)] for t in y])
        else:
            de = catalog.query("SELECT DISTINCT slide_id FROM de_labels WHERE slide_id IS NOT NULL")
            out = pd.DataFrame(de, columns=["slide_id"])
        out = folds.merge(out, on="slide_id", how="inner")
        return out.sort_values(["fold", "slide_id"]).reset_index(drop=True)

    def heads(self) -> pd.DataFrame:
        """Every registered head version: ``task``, ``model`` (its registry name), ``version``, ``aliases``
        (``best``, ``attention``, ``mean``, ...), the feature view and encoder it reads, the label set it was
        trained on, its cross-validation score and its MLflow ``run_id``; newest first."""
        telemetry_off()
        client = Tracker(self._paths).client
        rows = []
        for task, name in MODEL_NAMES.items():
            versions = client.search_model_versions(f"name = '{name}'")
            aliases: dict[str, list[str]] = {}
            if versions:  # search results carry no aliases: the registered model holds them
                for alias, version in client.get_registered_model(name).aliases.items():
                    aliases.setdefault(str(version), []).append(alias)
            for mv in versions:
                tags = dict(mv.tags)
                rows.append({"task": task, "model": name, "version": int(mv.version),
                             "aliases": sorted(aliases.get(str(mv.version), [])),
                             **{k: tags.get(k) for k in HEAD_TAGS}, "run_id": mv.run_id})
        frame = pd.DataFrame(rows, columns=["task", "model", "version", "aliases", *HEAD_TAGS, "run_id"])
        frame["cv_score"] = pd.to_numeric(frame.cv_score, errors="coerce")
        return frame.sort_values(["task", "version"], ascending=[True, False]).reset_index(drop=True)

    def head(self, task: str, alias: str = "best"):
        """A registered head (``task@alias``) that can be applied to a bag: ``head(features)`` gives (outputs,
        attention) for an (n_tiles, dim) array of the head's view (``head.view_id``). ``HeadNotFound`` names
        what to run."""
        from histcode.heads.apply import load_head

        telemetry_off()
        return load_head(Tracker(self._paths), task, alias)

    def cv_predictions(self, task: str, alias: str = "best") -> pd.DataFrame:
        """The out-of-fold predictions of the cross-validation behind the registered head ``task@alias``: one
        row per slide with ``slide_id``, the true class id ``y`` and each class's probability ``p_<class>``, every
        slide predicted by the fold model that never saw its patient (classification tasks; what the head's
        reported AUC is computed from)."""
        import tempfile

        from histcode.heads.apply import HeadNotFound

        telemetry_off()
        tracker = Tracker(self._paths)
        name = MODEL_NAMES.get(task)
        if name is None:
            raise UsageError(f"unknown task {task!r}; tasks: {', '.join(MODEL_NAMES)}")
        try:
            run_id = tracker.client.get_model_version_by_alias(name, alias).run_id
        except Exception as exc:  # noqa: BLE001 -- MLflow's own exception types
            raise HeadNotFound(f"no {name}@{alias} in the registry: run `histcode heads` first") from exc
        with tempfile.TemporaryDirectory(prefix="histcode-cv-") as tmp:
            try:
                local = tracker.download_artifacts(run_id, "predictions.csv", Path(tmp))
            except Exception as exc:  # noqa: BLE001 -- MLflow's own error for a missing artifact
                raise HeadNotFound(f"{name}@{alias} (run {run_id}) has no out-of-fold predictions.csv: its task has "
                                   "none (DE) or it was trained before they were logged") from exc
            return pd.read_csv(local, dtype={"slide_id": str})

    def predictions(self, *, task: str | None = None, slide_ids: Sequence[str] | None = None,
                    current: bool = True, wide: bool = False, format: Format = "pandas"):
        """The stored predictions (the catalog's ``predictions`` table, ``histcode.store.predictions``): one row per
        slide, head version, source (``predict``: `histcode predict`; ``cv``: out of fold, by the fold model that
        never saw the slide's patient) and output (``p_tumor``, ``p_luad``, ``de_<gene>``, ...) with ``value``,
        ``call``, the out-of-distribution check and ``stale`` (its task's ``@best`` is another version now).
        ``current``: only the row each slide's output is shown with (``current_predictions``); ``wide``: one row
        per slide, a column per output (numbers; DE outputs as their calls), as `histcode predict`'s CSV."""
        if wide and not current:
            raise UsageError("wide=True shows one row per slide: it needs current=True")
        source = CURRENT_SQL.format(table="predictions") if current else "SELECT * FROM predictions"
        found = self._stored_rows(source, "slide_id", task, slide_ids)
        rows = pd.DataFrame(found, columns=list(PREDICTION_COLUMNS))
        if wide:
            table: dict[str, dict] = {}
            for r in found:
                table.setdefault(r["slide_id"], {"slide_id": r["slide_id"]})[r["output"]] = \
                    r["call"] if r["output"].startswith("de_") else r["value"]
            rows = pd.DataFrame(list(table.values()), columns=None if table else ["slide_id"])
        check_format(format)
        return rows if format == "pandas" else convert(pa.Table.from_pandas(rows, preserve_index=False), format)

    def patient_predictions(self, *, task: str | None = None, patient_ids: Sequence[str] | None = None,
                            current: bool = True, format: Format = "pandas"):
        """The stored patient-level predictions (the catalog's ``patient_predictions`` table,
        ``histcode.store.patient_predictions``): one row per patient, head version, source (``cv``: pooled from the
        out-of-fold slide rows; ``predict``: from `histcode predict`'s) and output, with ``pooling`` (``mean``,
        ``max``, ``bag``; ``histcode.heads.patients``), the slides pooled (``slide_ids``, ``n_slides``) and
        ``stale``. ``current``: only the row each patient's output is shown with (``current_patient_predictions``)."""
        source = (CURRENT_PATIENT_SQL.format(table="patient_predictions") if current
                  else "SELECT * FROM patient_predictions")
        rows = pd.DataFrame(self._stored_rows(source, "patient_id", task, patient_ids),
                            columns=list(PATIENT_PREDICTION_COLUMNS))
        check_format(format)
        return rows if format == "pandas" else convert(pa.Table.from_pandas(rows, preserve_index=False), format)

    def _stored_rows(self, source: str, key: str, task: str | None, ids: Sequence[str] | None) -> list[dict]:
        """Rows of the stored-predictions query ``source``, of one ``task`` and the units (``key``: slide_id or
        patient_id) in ``ids`` when given."""
        if task is not None and task not in MODEL_NAMES:
            raise UsageError(f"unknown task {task!r}; tasks: {', '.join(MODEL_NAMES)}")
        clauses, params = [], []
        if task is not None:
            clauses.append("task = ?")
            params.append(task)
        if ids is not None:
            clauses.append(f"{key} IN (SELECT unnest(?::VARCHAR[]))")
            params.append([str(i) for i in ids])
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return Catalog(self._paths.catalog_path).query(f"SELECT * FROM ({source}){where} ORDER BY {key}, task, output",
                                                       params)

    def predict(self, paths: Sequence[str | Path] | str | Path, *, cohort: str | None = None,
                mpp: float | None = None, heatmaps: str | Path | None = None) -> pd.DataFrame:
        """`histcode predict` as a function: the slides at ``paths`` (files or folders) are ingested into the
        inference cohort (``cohort``, default ``cohorts.predict``), tiled, embedded in each registered head's view
        and scored by the heads; one row per slide (``status``, ``reason``, ``p_tumor``, subtype probabilities,
        DE calls, ``in_distribution``, ``ood_score``). A slide that fails gets ``status`` failed and its reason;
        the rest are predicted. ``mpp``: microns per pixel for slides without a usable scale; ``heatmaps``: a
        folder to draw them into."""
        from histcode.apps.predict import predict_slides
        from histcode.ingest.sources import ManifestError, sources_from_paths

        telemetry_off()
        cfg = self.config
        given = [paths] if isinstance(paths, (str, Path)) else list(paths)
        sources = sources_from_paths([Path(p) for p in given], cfg.ingest.extensions, mpp)
        if not sources:
            raise ManifestError(f"no slide files in {', '.join(map(str, given)) or 'the paths given'} (extensions: "
                                f"{', '.join(cfg.ingest.extensions)})")
        result = predict_slides(self._paths.ensure(), cfg, sources, Path(heatmaps) if heatmaps else None,
                                progress=False, cohort=cohort)
        return result.predictions

    def load_encoder(self, ref: str = "@adco"):
        """A registered encoder as a ``torch.nn.Module`` in eval mode (``"@adco"``, ``name@alias``, ``name/3``),
        for fine-tuning or embedding images of one's own."""
        from histcode.features.registry import load_encoder

        return load_encoder(self._paths, self._encoder(ref))

    # -- pictures ---------------------------------------------------------------------------------------
    def tile_image(self, slide_id: str, x: int, y: int, size: int, px: int | None = None):
        """A tile's pixels as a PIL image: the level-0 square at (``x``, ``y``) of side ``size`` (the columns
        of ``View.tiles`` and ``View.nearest``), resized to ``px`` when given."""
        from histcode.api.slides import tile_image

        return tile_image(self._paths, slide_id, x, y, size, px)

    def thumbnail(self, slide_id: str, side: int = 1200):
        """The slide at about ``side`` pixels on its longer side: (an RGB array, (dx, dy) level-0 pixels per
        thumbnail pixel)."""
        from histcode.api.slides import thumbnail

        return thumbnail(self._paths, slide_id, side)

    def attention(self, slide_id: str, alias: str = "attention") -> pd.DataFrame:
        """The registered tumour head's attention over the slide's tiles (``tile_id``, ``x``, ``y``, ``size``,
        ``attention`` smoothed as heatmaps draw it, ``attention_raw``) and the slide's ``p_tumor``."""
        from histcode.api.slides import attention

        telemetry_off()
        return attention(self._paths, slide_id, alias)

    def heatmap(self, slide_id: str, tiles: pd.DataFrame | None = None, *, score: str = "attention",
                kind: str = "sequential", alias: str = "attention", side: int = 1200):
        """Per-tile scores painted over the slide's thumbnail in the project's colour maps (an RGB array, as
        `histcode heatmap` and the viewer paint them): ``tiles`` a frame with ``x``, ``y``, ``size`` and the
        ``score`` column (default: the attention of the tumour head ``@alias``, ``Workspace.attention``); ``kind``
        ``diverging`` for signed scores (a gene's log2FC)."""
        from histcode.api.slides import scores_picture

        frame = self.attention(slide_id, alias) if tiles is None else tiles
        return scores_picture(self._paths, slide_id, frame, score, kind, side)

    def __repr__(self) -> str:
        return f"histcode.Workspace({str(self.root)!r})"


class WorkspaceNotFound(HistcodeError, FileNotFoundError):
    """``histcode.open`` was given a folder that does not exist."""


def open(path: str | Path | None = None) -> Workspace:  # noqa: A001 -- histcode.open, as the issue's API names it
    """The workspace at ``path``; without one, the same as the command line's default: ``$HISTCODE_HOME``, else
    the source checkout HistCode runs from, else the current directory. ``WorkspaceNotFound`` when the folder
    does not exist (opening never creates one). Like the command line, it caps glibc's malloc arenas for the
    process (``histcode.runtime.limit_malloc_arenas``; unless ``MALLOC_ARENA_MAX`` is set), so that streaming a
    large view through Lance's reader threads does not grow by their arenas' fragmentation."""
    from histcode.runtime import limit_malloc_arenas

    limit_malloc_arenas()
    paths = Paths.resolve(path)
    if not paths.root.is_dir():
        raise WorkspaceNotFound(f"no workspace at {paths.root}: create one with `histcode --workspace {paths.root} "
                                "demo` (or ingest slides into it)")
    return Workspace(paths)


def load_encoder(workspace: Workspace | str | Path | None = None, ref: str = "@adco"):
    """A registered encoder as a ``torch.nn.Module`` in eval mode, for fine-tuning or embedding images of one's
    own: ``workspace`` a Workspace, its folder or None (``histcode.open()``'s default), ``ref`` ``"@adco"`` (an
    alias of the workspace's encoders: ``@moco``, ``@uni``, ...), ``name@alias``, ``name/3`` or ``name``."""
    ws = workspace if isinstance(workspace, Workspace) else open(workspace)
    return ws.load_encoder(ref)
