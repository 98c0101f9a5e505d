"""Feature views: which encoder version, on which tiling spec, with which preprocessing, made a table's vectors.

A view is identified by (registered model name, model version, spec_id, input size); a new encoder version is
a new view with new tables, so vectors of two encoders are never mixed. Views and the per-slide ledger of
materialisation work live in the DuckDB catalog; the vectors live in LanceDB.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from histcode.config import stable_hash
from histcode.errors import HistcodeError
from histcode.store.agreement import catalog_state, committed_dataset, record_versions
from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, TableSpec
from histcode.tiling.spec import spec_id_of
from histcode.tracking import Tracker, quote

log = logging.getLogger(__name__)

METRIC = "cosine"
SLIDE_METHOD_PREFIX = "slide:"  # the method of a slide-level view: slide:<slide encoder>
REF = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))?$")


class ViewError(HistcodeError, LookupError):
    """No such encoder, view or materialisation; the message says what exists."""


@dataclass(frozen=True)
class FeatureView:
    view_id: str
    model_name: str
    model_version: str
    method: str | None
    dim: int
    spec_id: str
    image_px: int
    attribute_columns: tuple[str, ...] = field(default=())
    mpp: float | None = None  # microns per pixel the encoder was trained at (foundation encoders); None: the spec's

    @property
    def slide_level(self) -> bool:
        """Whether the view holds one vector per slide from a slide encoder (``histcode.features.slide_embed``),
        and no tile vectors of its own."""
        return (self.method or "").startswith(SLIDE_METHOD_PREFIX)

    @property
    def source_view_id(self) -> str | None:
        """The tile view a slide-level view was computed from (None for a tile view)."""
        return self.model_version.split(".", 1)[0] if self.slide_level else None

    @property
    def encoder_uri(self) -> str:
        if self.slide_level:  # not an MLflow model: the slide encoder and the tile view it read
            return f"{self.model_name}/{self.model_version}"
        return f"models:/{self.model_name}/{self.model_version}"

    def tile_field(self, tile_px: int, target_mpp: float) -> float:
        """How much of a spec tile (``tile_px`` at ``target_mpp``) the encoder's input covers: 1 for encoders
        trained here; for a foundation encoder, its input side in microns over the tile's."""
        return 1.0 if self.mpp is None else (self.image_px * self.mpp) / (tile_px * target_mpp)

    def table(self, kind: str) -> TableSpec:
        return TableSpec(self.view_id, kind, self.dim, self.encoder_uri, self.attribute_columns)


def view_id_of(model_name: str, model_version: str, spec_id: str, image_px: int) -> str:
    return "fv-" + stable_hash({"model": model_name, "version": model_version, "spec": spec_id, "px": image_px}, 10)


def resolve_encoder(tracker: Tracker, ref: str) -> tuple[str, str, dict]:
    """``name@alias``, ``name/3``, ``name`` (latest) or a ``models:/`` URI -> (name, version, version tags)."""
    match = REF.match(ref.strip())
    if not match:
        raise ViewError(f"encoder reference {ref!r} is not name, name@alias or name/version")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = tracker.client
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version and version != "latest":
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = {quote(name)}")
            if not versions:
                raise ViewError(f"no registered model {name!r}: run `histcode pretrain` first")
            mv = max(versions, key=lambda v: int(v.version))
    except ViewError:
        raise
    except Exception as exc:  # noqa: BLE001 -- MLflow raises MlflowException subclasses with its own text
        raise ViewError(f"encoder {ref!r} not found in the model registry ({tracker.uri}): {exc}") from exc
    return name, str(mv.version), dict(mv.tags)


def describe_view(tracker: Tracker, ref: str, spec_id: str, attribute_columns: tuple[str, ...]) -> FeatureView:
    name, version, tags = resolve_encoder(tracker, ref)
    try:
        dim, image_px = int(tags["dim"]), int(tags["image_px"])
    except KeyError as exc:
        raise ViewError(f"{name} version {version} lacks the dim/image_px tags histcode registers encoders with") from exc
    mpp = float(tags["mpp"]) if tags.get("mpp") else None
    return FeatureView(view_id_of(name, version, spec_id, image_px), name, version, tags.get("method"), dim, spec_id,
                       image_px, tuple(attribute_columns), mpp)


def slide_view_of(source: FeatureView, encoder: str, dim: int, weights_sha: str) -> FeatureView:
    """The slide-level view a slide encoder (``encoder``, a ``SLIDE_ENCODERS`` name) makes from a tile view:
    model ``slide:<encoder>``, version ``<source view id>.<hash of the weights>`` (the same weights over the same
    tile view are the same view, grown by more slides; other weights or another tile view are another view)."""
    version = f"{source.view_id}.{weights_sha[:12]}"
    model = f"{SLIDE_METHOD_PREFIX}{encoder}"
    return FeatureView(view_id_of(model, version, source.spec_id, source.image_px), model, version, model, int(dim),
                       source.spec_id, source.image_px, source.attribute_columns)


def register_view(catalog: Catalog, view: FeatureView) -> None:
    """The view's rows in ``feature_views``: a tile and a slide row, or, for a slide-level view, its slide row
    only (it has no tile table)."""
    now = utcnow()
    with catalog.transaction() as con:
        for kind in ((SLIDE_KIND,) if view.slide_level else (TILE_KIND, SLIDE_KIND)):
            exists = con.execute("SELECT 1 FROM feature_views WHERE view_id = ? AND kind = ?", [view.view_id, kind]).fetchall()
            if not exists:
                con.execute(
                    "INSERT INTO feature_views VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'empty', ?, ?)",
                    [view.view_id, kind, view.encoder_uri, view.model_name, view.model_version, view.method, view.dim,
                     METRIC, view.spec_id, view.image_px, view.table(kind).name, now, now],
                )


def set_view_status(catalog: Catalog, view_id: str, status: str) -> None:
    with catalog.transaction() as con:
        con.execute("UPDATE feature_views SET status = ?, updated_at = ? WHERE view_id = ?", [status, utcnow(), view_id])


def list_views(catalog: Catalog) -> list[dict]:
    """One row per view: its tile row, or, for a slide-level view (no tile row), its slide row."""
    return catalog.query(
        "SELECT * FROM feature_views f WHERE kind = 'tile' OR (kind = 'slide' AND NOT EXISTS "
        "(SELECT 1 FROM feature_views t WHERE t.view_id = f.view_id AND t.kind = 'tile')) "
        "ORDER BY updated_at DESC, view_id")


def load_view(catalog: Catalog, view_id: str | None = None, attribute_columns: tuple[str, ...] = ()) -> FeatureView:
    """A registered view by id, or (None) the most recently materialised one (commands use ``resolve_view``,
    whose default is the configured encoder's view)."""
    rows = list_views(catalog)
    if view_id is not None:
        rows = [r for r in rows if r["view_id"] == view_id]
        if not rows:
            known = ", ".join(r["view_id"] for r in list_views(catalog)) or "none"
            raise ViewError(f"no feature view {view_id!r} (views: {known})")
    else:
        rows = [r for r in rows if r["status"] in ("ok", "partial")]
        if not rows:
            raise ViewError("no materialised feature view yet: run `histcode embed`")
    r = rows[0]
    return FeatureView(r["view_id"], r["model_name"], r["model_version"], r["method"], r["dim"], r["spec_id"],
                       r["image_px"], tuple(attribute_columns))


def encoder_view(catalog: Catalog, tracker: Tracker, cfg, ref: str) -> FeatureView:
    """The view a registered encoder (``name@alias``, ``name/3``, ``name``) makes under the current tiling
    spec, once it is materialised; ViewError naming the views there are otherwise. ``cfg``: the HistcodeConfig."""
    spec_id = spec_id_of(cfg.tiling)
    view = describe_view(tracker, ref, spec_id, cfg.features.attribute_columns)
    rows = [r for r in list_views(catalog) if r["view_id"] == view.view_id and r["status"] in ("ok", "partial")]
    if not rows:
        known = ", ".join(f"{r['view_id']} ({r['model_name']}/{r['model_version']})" for r in list_views(catalog))
        raise ViewError(f"the view {view.view_id} of encoder {ref} ({view.model_name}/{view.model_version}, tiling "
                        f"spec {spec_id}) is not materialised: run `histcode embed --encoder {ref}` "
                        f"(views: {known or 'none'})")
    return view


def default_view(catalog: Catalog, tracker: Tracker, cfg) -> FeatureView:
    """The one default view of every command that reads vectors: ``features.encoder`` (what `histcode embed`
    writes by default) under the current tiling spec. ``cfg``: the HistcodeConfig."""
    try:
        return encoder_view(catalog, tracker, cfg, cfg.features.encoder)
    except ViewError as exc:
        raise ViewError(f"the default view is features.encoder = {cfg.features.encoder!r} on tiling spec "
                        f"{spec_id_of(cfg.tiling)}: {exc}; pass --view or set features.encoder") from exc


def resolve_view(catalog: Catalog, tracker: Tracker, cfg, view_id: str | None = None) -> FeatureView:
    """``view_id`` when given, else the default view (``default_view``). Commands print the view they used."""
    view = load_view(catalog, view_id, cfg.features.attribute_columns) if view_id else default_view(catalog, tracker, cfg)
    log.debug("feature view %s (encoder %s/%s, %s)", view.view_id, view.model_name, view.model_version, view.method)
    return view


def training_state(catalog: Catalog, view: FeatureView, cohorts: list[str]) -> list[tuple[str, str, int]]:
    """(slide, content hash, rows) of the training cohorts' slides this view has embedded, by slide id: what the
    heads (and the out-of-distribution reference) read. Vectors of other cohorts (predicted slides) and
    compactions of the tables do not change it."""
    training = {s["slide_id"] for s in catalog.tiled_slides(view.spec_id, cohorts)}
    rows = catalog.query("SELECT slide_id, content_hash, rows FROM materializations WHERE view_id = ? AND status = 'ok' "
                         "ORDER BY slide_id", [view.view_id])
    return [(r["slide_id"], r["content_hash"], int(r["rows"])) for r in rows if r["slide_id"] in training]


def done_slides(catalog: Catalog, view_id: str) -> dict[str, str]:
    """slide_id -> content hash of the slides this view has finished."""
    rows = catalog.query("SELECT slide_id, content_hash FROM materializations WHERE view_id = ? AND status = 'ok'", [view_id])
    return {r["slide_id"]: r["content_hash"] for r in rows}


def record_materializations(catalog: Catalog, view_id: str, rows: list[dict], tables: dict | None = None) -> None:
    """Ledger rows (slide_id, content_hash, rows, status, error, lance_version, started_at) in one transaction,
    with the versions of the view's ``tables`` ({kind: Lance table}) just written: what SQL and search read
    (``histcode.store.agreement``)."""
    now = utcnow()
    with catalog.transaction() as con:
        record_versions(con, view_id, tables or {})
        for r in rows:
            con.execute("DELETE FROM materializations WHERE view_id = ? AND slide_id = ?", [view_id, r["slide_id"]])
            con.execute(
                "INSERT INTO materializations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [view_id, r["slide_id"], r["content_hash"], r["rows"], r["status"], r.get("error"),
                 r.get("lance_version"), r.get("started_at", now), now],
            )


def committed_version(catalog: Catalog, uri: str, view: FeatureView, kind: str) -> int | None:
    """The version of the view's ``kind`` table as of its last ledger commit, which readers read, checked against
    the ledger: StoresDisagree naming what is wrong when the table is missing or short; None when no version is
    recorded (a catalog from before they were, or nothing materialised: read the latest)."""
    from histcode.store.vectors import connect

    ledger, pinned = catalog_state(catalog)
    name = view.table(kind).name
    dataset = committed_dataset(connect(uri), view.view_id, kind, name, ledger.get(view.view_id, {}), pinned.get(name))
    return None if dataset is None or name not in pinned else dataset.version


def record_table_versions(catalog: Catalog, view_id: str, tables: dict) -> None:
    """Move the versions readers read to the tables' current ones, after a step that changed no row the ledger
    records (compaction, new indices)."""
    with catalog.transaction() as con:
        record_versions(con, view_id, tables)


def load_encoder(workspace, ref: str):
    """A registered encoder, ours or a foundation one, as an ``nn.Module`` in eval mode that can be fine-tuned
    (``.train()``); ``workspace``: a Workspace or its folder; ``ref``: ``name@alias``, ``name/3`` or ``name``.
    (``embed`` runs the exported program instead, which is faster but cannot train.)"""
    import tempfile
    from pathlib import Path

    from histcode.ssl.modules import MODULE_ARTIFACT, load_module
    from histcode.workspace import Workspace

    ws = workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    tracker = Tracker(ws)
    name, version, tags = resolve_encoder(tracker, ref)
    run_id = tags.get("run_id") or tracker.client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="histcode-encoder-") as tmp:
        try:
            folder = tracker.download_artifacts(run_id, MODULE_ARTIFACT, Path(tmp))
        except Exception as exc:  # noqa: BLE001 -- MLflow raises its own types for a missing artifact
            raise ViewError(f"{name} version {version} (run {run_id}) has no {MODULE_ARTIFACT} artifact: it was "
                            "registered before HistCode saved encoders as modules; pretrain or register it again "
                            f"(its exported program still embeds: models:/{name}/{version})") from exc
        return load_module(folder)
