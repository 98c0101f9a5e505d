"""A feature view from Python: its tile and slide vectors as tables (whole or streamed), at a table version,
nearest tiles and similar slides, and the bags of a task for a model of one's own."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from histcode.api.frames import Format, check_format, convert, converted, read_batches, read_table, row_filter
from histcode.config import HistcodeConfig
from histcode.features.read import view_table
from histcode.features.registry import FeatureView, committed_version
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND
from histcode.workspace import Workspace as Paths

if TYPE_CHECKING:
    from PIL import Image

    from histcode.api.bags import BagDataset

BATCH_ROWS = 65_536  # rows per streamed batch: 128 MB of 512-d vectors


@dataclass(frozen=True)
class View:
    """One feature view: the vectors that one registered encoder version made from one tiling spec. Get one
    from ``Workspace.view``. Tables have a ``vector`` column (``FLOAT[dim]``) beside ``tile_id``/``slide_id``,
    ``patient_id``, the tile corner ``x``, ``y`` and ``size`` (level-0 pixels) and the promoted slide attributes
    (``subtype``, ``sample_type``, ...)."""

    _paths: Paths
    config: HistcodeConfig
    _view: FeatureView

    # -- what the view is -------------------------------------------------------------------------------
    @property
    def view_id(self) -> str:
        """The view's id, ``fv-`` and ten hex digits (stable for an encoder version, tiling spec and input size)."""
        return self._view.view_id

    @property
    def encoder(self) -> str:
        """The registered encoder's URI, ``models:/<name>/<version>``."""
        return self._view.encoder_uri

    @property
    def method(self) -> str | None:
        """How the encoder was trained (``adco``, ``moco``, ``simclr``, ``random``) or its foundation name."""
        return self._view.method

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        return self._view.dim

    @property
    def spec_id(self) -> str:
        """The tiling spec's id (``ts-`` and twelve hex digits)."""
        return self._view.spec_id

    @property
    def spec(self) -> dict:
        """The tiling spec the view's tiles were cut with (tile size, target microns per pixel, tissue
        thresholds, ...)."""
        rows = Catalog.of(self._paths).query("SELECT spec_json FROM tiling_specs WHERE spec_id = ?", [self.spec_id])
        return json.loads(rows[0]["spec_json"]) if rows else {}

    def lineage(self) -> dict:
        """Where the vectors come from: the encoder (its MLflow run and tags), the tiling spec, the slides and
        rows materialised, and the Lance tables' current versions and tags (``as_of=`` takes either)."""
        from histcode.tracking import Tracker

        tracker = Tracker(self._paths)
        fv = self._view
        try:
            tags = dict(tracker.client.get_model_version(fv.model_name, fv.model_version).tags)
        except Exception:  # noqa: BLE001 -- a registry that lost the version still has a view to describe
            tags = {}
        ledger = Catalog.of(self._paths).query(
            "SELECT count(*) AS slides, coalesce(sum(rows), 0) AS tiles FROM materializations "
            "WHERE view_id = ? AND status = 'ok'", [fv.view_id])[0]
        tables = {}
        for kind in (TILE_KIND, SLIDE_KIND):
            table = view_table(self._paths, fv, kind)
            tables[kind] = {"name": fv.table(kind).name, "version": table.version,
                            "tags": sorted(table.tags.list())}
        return {"view_id": fv.view_id, "encoder": fv.encoder_uri, "method": fv.method, "dim": fv.dim,
                "encoder_run_id": tags.get("run_id"), "encoder_tags": tags, "spec_id": fv.spec_id, "spec": self.spec,
                "image_px": fv.image_px, "slides": int(ledger["slides"]), "tiles": int(ledger["tiles"]),
                "tables": tables}

    def versions(self, kind: str = TILE_KIND) -> list[dict]:
        """The versions of the view's ``tile`` (or ``slide``) table: ``version``, ``timestamp`` and the tags
        pointing at it; any of them reads the table as it was (``as_of=``)."""
        table = view_table(self._paths, self._view, kind)
        tags: dict[int, list[str]] = {}
        for name, tag in table.tags.list().items():
            tags.setdefault(int(tag["version"]), []).append(name)
        return [{"version": int(v["version"]), "timestamp": v["timestamp"], "tags": sorted(tags.get(int(v["version"]), []))}
                for v in table.list_versions()]

    # -- reading ----------------------------------------------------------------------------------------
    def _as_of(self, kind: str, as_of: int | str | None) -> int | str | None:
        """``as_of``, or, when None, the version of the last ledger commit (``committed_version``): vectors of a
        write whose ledger commit never happened are not read."""
        if as_of is not None or (kind == TILE_KIND and self._view.slide_level):  # no tile table: view_table says so
            return as_of
        return committed_version(Catalog.of(self._paths), self._paths.lancedb_uri, self._view, kind)

    def _read(self, kind: str, where, columns, as_of, batch_size: int | None = None, **ids):
        table = view_table(self._paths, self._view, kind, self._as_of(kind, as_of))
        args = (table.to_lance(), self._view.table(kind).name, columns, row_filter(where, **ids))
        return read_table(*args) if batch_size is None else read_batches(*args, batch_size)

    def tiles(self, where: str | None = None, *, columns: Sequence[str] | None = None,
              slide_ids: Sequence[str] | None = None, tile_ids: Sequence[str] | None = None,
              as_of: int | str | None = None, format: Format = "pandas"):
        """The view's tile rows: ``where`` a SQL filter over the table's columns (``"subtype = 'LUSC' AND x >
        1000"``), ``columns`` the columns wanted (default all), ``slide_ids`` / ``tile_ids`` only those (read
        through the id indices; both: tiles in both), ``as_of`` a table version or tag. A pandas DataFrame, a
        pyarrow Table or a polars DataFrame (``format``). For views larger than memory use ``iter_tiles``."""
        check_format(format)
        return convert(self._read(TILE_KIND, where, columns, as_of, slide_id=slide_ids, tile_id=tile_ids), format)

    def iter_tiles(self, where: str | None = None, *, columns: Sequence[str] | None = None,
                   slide_ids: Sequence[str] | None = None, tile_ids: Sequence[str] | None = None,
                   as_of: int | str | None = None, batch_size: int = BATCH_ROWS, format: Format = "pandas") -> Iterator:
        """``tiles`` streamed: batches of at most ``batch_size`` rows (pandas or polars frames, or pyarrow
        RecordBatches), so that memory holds one batch whatever the view's size."""
        check_format(format)
        return converted(self._read(TILE_KIND, where, columns, as_of, batch_size, slide_id=slide_ids,
                                    tile_id=tile_ids), format)

    def slides(self, where: str | None = None, *, columns: Sequence[str] | None = None,
               slide_ids: Sequence[str] | None = None, as_of: int | str | None = None, format: Format = "pandas"):
        """The view's slide rows (the mean of each slide's tile vectors, ``n_tiles``, ``patient_id`` and the
        slide attributes), filtered and returned as ``tiles`` does."""
        check_format(format)
        return convert(self._read(SLIDE_KIND, where, columns, as_of, slide_id=slide_ids), format)

    # -- search -----------------------------------------------------------------------------------------
    def nearest(self, tile_id: str | None = None, *, vector: Sequence[float] | np.ndarray | None = None,
                image: str | Path | np.ndarray | Image.Image | None = None, k: int = 10, where: str | None = None,
                as_of: int | str | None = None, format: Format = "pandas"):
        """The ``k`` tiles nearest (cosine distance) to a tile of the view, a vector of the view's dimension or
        an image (a file, an RGB array or a PIL image, embedded by the view's encoder), among the tiles
        matching ``where``; ranked (``rank``, ``distance``) with their metadata, the query tile left out. What
        `histcode search --tile/--image` prints."""
        from histcode.features.search import SearchError, embed_image, nearest, search

        check_format(format)
        given = sum(x is not None for x in (tile_id, vector, image))
        if given != 1:
            raise SearchError("give exactly one of tile_id, vector or image")
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        fv, features = self._view, self.config.features
        if tile_id is not None:
            hits = search(self._paths, fv, features, tile_id=tile_id, k=k, where=where, as_of=as_of)
            return convert(hits, format)
        if vector is not None:
            query = np.asarray(vector, dtype=np.float32).reshape(-1)
            if query.shape[0] != fv.dim:
                raise SearchError(f"a query vector of view {fv.view_id} has {fv.dim} values, not {query.shape[0]}")
        else:
            query = embed_image(self._paths, fv, image)
        return convert(nearest(view_table(self._paths, fv, TILE_KIND, self._as_of(TILE_KIND, as_of)), query, k, where,
                               features), format)

    def similar_slides(self, slide_id: str, *, k: int = 10, where: str | None = None, centring: str = "mean",
                       as_of: int | str | None = None, format: Format = "pandas"):
        """The ``k`` slides most like ``slide_id`` (cosine distance of mean-pooled vectors, centred on the view's
        mean slide by default), among the slides matching ``where``: `histcode search --slide`."""
        from histcode.features.search import search

        check_format(format)
        return convert(search(self._paths, self._view, self.config.features, slide_id=slide_id, k=k, where=where,
                              as_of=as_of, centring=centring), format)

    # -- training ---------------------------------------------------------------------------------------
    def bags(self, task: str, *, as_of: int | str | None = None) -> BagDataset:
        """The labelled slides of ``task`` (``tumor``, ``subtype`` or ``de``) as a ``torch.utils.data.Dataset``
        of (bag tensor ``(n_tiles, dim)``, target, slide id), with the patient folds the heads use
        (``.folds``, ``.split(k)``). The bags are memory-mapped, not loaded. Needs a label set that passed the
        gate (``LabelGateError`` otherwise)."""
        from histcode.api.bags import BagDataset

        return BagDataset.of(self._paths, self._view, task, self._as_of(TILE_KIND, as_of))

    def __repr__(self) -> str:
        fv = self._view
        return (f"View({fv.view_id}: {fv.model_name}/{fv.model_version} ({fv.method}), {fv.dim}-d, "
                f"tiling {fv.spec_id})")
