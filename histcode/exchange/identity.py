"""How an imported feature view is named.

An imported view is a feature view like an embedded one (same tables, same ledger), whose "encoder" is the
other tool's extraction:

- model name ``<tool>:<encoder>`` (``trident:uni_v1``, ``clam:resnet50_trunc``): never a registered MLflow
  model, so nothing mistakes it for one of HistCode's encoders;
- model version ``i`` + a hash of (tool, encoder, dimension, importer version): the same extraction
  imported again, or grown by more slides, is the same view; another encoder or dimension is another view;
- tiling spec ``ts-`` + a hash of the imported grid (``patches.SlidePatches.grid``): registered in
  ``tiling_specs`` with ``importer`` in its JSON, so it never collides with a spec HistCode tiles itself;
- view id as for every view (``view_id_of``: model, version, spec, input px = the tool's patch side).
"""

from __future__ import annotations

from histcode.config import stable_hash
from histcode.exchange.patches import IMPORTER_VERSION
from histcode.features.registry import FeatureView, view_id_of

IMPORTED_METHOD = "imported:{tool}"


def imported_spec_id(grid: dict) -> str:
    return "ts-" + stable_hash(grid, length=12)


def imported_view(tool: str, encoder: str, dim: int, grid: dict, attribute_columns: tuple[str, ...]) -> FeatureView:
    model_name = f"{tool}:{encoder}"
    version = "i" + stable_hash({"tool": tool, "encoder": encoder, "dim": int(dim), "importer": IMPORTER_VERSION}, 8)
    spec_id = imported_spec_id(grid)
    image_px = int(grid["tile_px"])
    return FeatureView(view_id_of(model_name, version, spec_id, image_px), model_name, version,
                       IMPORTED_METHOD.format(tool=tool), int(dim), spec_id, image_px, tuple(attribute_columns))


def imported_from(view: FeatureView) -> tuple[str, str] | None:
    """(tool, encoder) of an imported view; None for a view HistCode embedded."""
    tool, sep, encoder = view.model_name.partition(":")
    return (tool, encoder) if sep and (view.method or "").startswith("imported:") else None
