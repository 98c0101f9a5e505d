"""`histcode export anndata VIEW`: a view's tiles as an AnnData file (``.h5ad``) for scanpy / squidpy users.

The anndata package cannot be installed beside pandas 3, so the file is written with h5py following AnnData's
on-disk format specification (anndata 0.8+, "On-disk format"): the root group is ``anndata`` 0.1.0; ``obs`` and
``var`` are ``dataframe`` 0.2.0 groups with ``_index`` and ``column-order`` attributes; dense arrays are
``array`` 0.2.0; text is ``string-array`` 0.2.0 (variable-length UTF-8); repeated text is ``categorical``
0.2.0 (``codes``, ``categories``, ``ordered``; code -1 for a missing value); ``obsm``, ``uns`` and the other
mappings are ``dict`` 0.1.0; scalars in ``uns`` are ``string`` / ``numeric-scalar`` 0.2.0.

What it holds: one observation per tile (index: tile id); ``X`` the (tiles, dim) float32 vectors; ``obs``
slide_id, patient_id, cohort, tile_id, x, y (level-0 top-left corner), size (level-0 side) and the slides'
attributes from the manifest; ``obsm['spatial']`` the tiles' level-0 centres (float64, what squidpy's spatial
plots expect per spot); ``var`` one row per dimension (``dim0`` ...); ``uns['histcode']`` the view (encoder,
view, spec and their ids). Vectors are written a few slides at a time, so memory stays bounded by the chunk.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from histcode.exchange.h5files import h5py
from histcode.exchange.view_rows import exported_slides, slide_tiles, tile_total, view_spec
from histcode.features.registry import FeatureView
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

ARRAY = ("array", "0.2.0")
STRINGS = ("string-array", "0.2.0")
CATEGORICAL = ("categorical", "0.2.0")
DATAFRAME = ("dataframe", "0.2.0")
DICT = ("dict", "0.1.0")
STRING = ("string", "0.2.0")
NUMERIC = ("numeric-scalar", "0.2.0")
ANNDATA = ("anndata", "0.1.0")
OBS_FIXED = ("slide_id", "patient_id", "cohort", "tile_id", "x", "y", "size")


def _encode(node, kind: tuple[str, str]) -> None:
    node.attrs["encoding-type"], node.attrs["encoding-version"] = kind


def _strings(lib, group, name: str, values) -> None:
    data = np.array([str(v) for v in values], dtype=object)
    _encode(group.create_dataset(name, data=data, dtype=lib.string_dtype("utf-8")), STRINGS)


def _categorical(lib, group, name: str, values: list[str | None]) -> None:
    categories = sorted({v for v in values if v is not None})
    lookup = {c: i for i, c in enumerate(categories)}
    dtype = np.int8 if len(categories) < 2**7 else np.int16 if len(categories) < 2**15 else np.int32
    node = group.create_group(name)
    _encode(node, CATEGORICAL)
    node.attrs["ordered"] = np.bool_(False)
    _encode(node.create_dataset("codes", data=np.array([lookup.get(v, -1) if v is not None else -1 for v in values],
                                                       dtype=dtype)), ARRAY)
    _strings(lib, node, "categories", categories)


def _dataframe(lib, group, name: str, index: list[str], index_key: str = "_index"):
    node = group.create_group(name)
    _encode(node, DATAFRAME)
    node.attrs["_index"] = index_key
    _strings(lib, node, index_key, index)
    return node


def _column_order(lib, node, columns: list[str]) -> None:
    node.attrs["column-order"] = np.array(columns, dtype=lib.string_dtype("utf-8"))


def _mapping(group, name: str):
    node = group.create_group(name)
    _encode(node, DICT)
    return node


def _scalar(lib, group, name: str, value) -> None:
    if isinstance(value, str):
        _encode(group.create_dataset(name, data=value, dtype=lib.string_dtype("utf-8")), STRING)
    else:
        _encode(group.create_dataset(name, data=np.asarray(value)), NUMERIC)


def _slide_attributes(slide: dict) -> dict[str, str]:
    attrs = json.loads(slide["attributes"]) if slide.get("attributes") else {}
    return {str(k): str(v) for k, v in attrs.items() if v not in (None, "")}


def export_anndata(ws: Workspace, view: FeatureView, out: Path | None = None,
                   slide_ids: list[str] | None = None) -> Path:
    """Write the view's done slides (or ``slide_ids``) as one ``.h5ad`` (default:
    outputs/exchange/<view>.h5ad), to a temporary name renamed when complete."""
    lib = h5py()
    catalog = Catalog.of(ws)
    slides = exported_slides(ws, view, slide_ids)
    total = tile_total(ws, view, slides)
    path = Path(out) if out is not None else ws.outputs_dir / "exchange" / f"{view.view_id}.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    obs: dict[str, list] = {k: [] for k in ("slide_id", "patient_id", "cohort", "tile_id")}
    xy, sizes, attrs_of = [], [], []
    try:
        with lib.File(tmp, "w") as f:
            _encode(f, ANNDATA)
            x = f.create_dataset("X", shape=(total, view.dim), dtype=np.float32,
                                 chunks=(max(1, min(total, 4096)), view.dim))
            _encode(x, ARRAY)
            row = 0
            for st in slide_tiles(ws, view, slides):
                n = len(st.tile_ids)
                x[row:row + n] = st.vectors
                row += n
                obs["slide_id"] += [st.slide_id] * n
                obs["patient_id"] += [st.slide.get("patient_id")] * n
                obs["cohort"] += [st.slide.get("cohort")] * n
                obs["tile_id"] += st.tile_ids
                xy.append(st.xy)
                sizes.append(np.full(n, st.size, np.int32))
                attrs_of.append((n, _slide_attributes(st.slide)))
            if row != total:  # rows appeared or went while the file was written
                raise RuntimeError(f"view {view.view_id} changed while it was exported ({row} tiles read, {total} counted)")
            corners = np.concatenate(xy) if xy else np.zeros((0, 2), np.int64)
            size = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
            frame = _dataframe(lib, f, "obs", obs["tile_id"])
            for name in ("slide_id", "patient_id", "cohort"):
                _categorical(lib, frame, name, obs[name])
            _strings(lib, frame, "tile_id", obs["tile_id"])
            _encode(frame.create_dataset("x", data=corners[:, 0]), ARRAY)
            _encode(frame.create_dataset("y", data=corners[:, 1]), ARRAY)
            _encode(frame.create_dataset("size", data=size), ARRAY)
            keys = sorted({k for _, a in attrs_of for k in a} - set(OBS_FIXED) - {"_index"})
            for key in keys:
                _categorical(lib, frame, key, [a.get(key) for n, a in attrs_of for _ in range(n)])
            _column_order(lib, frame, [*OBS_FIXED, *keys])
            var = _dataframe(lib, f, "var", [f"dim{i}" for i in range(view.dim)])
            _column_order(lib, var, [])
            obsm = _mapping(f, "obsm")
            _encode(obsm.create_dataset("spatial", data=corners.astype(np.float64) + size[:, None] / 2.0), ARRAY)
            for name in ("layers", "obsp", "varm", "varp"):
                _mapping(f, name)
            uns = _mapping(_mapping(f, "uns"), "histcode")
            spec = view_spec(catalog, view)
            for key, value in (("encoder", view.model_name), ("encoder_version", view.model_version),
                               ("encoder_uri", view.encoder_uri), ("method", view.method or ""),
                               ("view_id", view.view_id), ("spec_id", view.spec_id),
                               ("spec", json.dumps(spec, sort_keys=True)), ("dim", int(view.dim)),
                               ("image_px", int(view.image_px)),
                               ("coordinates", "level-0 pixels: obs x, y top-left corners, obs size the side, "
                                               "obsm['spatial'] the centres")):
                _scalar(lib, uns, key, value)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("view %s: %d tiles of %d slides written to %s", view.view_id, total, len(slides), path)
    return path
