"""`histcode export h5 VIEW`: a view's tiles as TRIDENT writes them, so TRIDENT, CLAM and STAMP users read
HistCode's features with their own loaders.

Layout (TRIDENT's job folder): ``<out>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``,
each file with ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 top-left corners, and TRIDENT's
attributes (see ``h5files``). The encoder is the imported one for an imported view (so exporting and importing
again gives the same view), else ``<model>-v<version>`` of HistCode's encoder. The magnification is nominal:
10 / um per pixel (0.5 um/px: 20x), from the spec's target and the slide's scan. A file is named by the slide id,
or by the slide's file stem where the id is not a safe file name (TRIDENT names files by slide stem; the
importer matches either).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from histcode.exchange.h5files import write_trident_file
from histcode.exchange.identity import imported_from
from histcode.exchange.patches import number
from histcode.exchange.view_rows import exported_slides, slide_tiles, view_spec
from histcode.features.registry import FeatureView
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace, file_stem

log = logging.getLogger(__name__)


@dataclass
class H5Export:
    folder: Path  # the features_<encoder> folder
    files: list[Path] = field(default_factory=list)
    tiles: int = 0


def encoder_name(view: FeatureView) -> str:
    imported = imported_from(view)
    return imported[1] if imported else file_stem(f"{view.model_name}-v{view.model_version}")


def _mag_text(mag) -> str:
    return str(number(mag)) if mag is not None else "unknown"


def slide_file_stem(slide: dict) -> str:
    sid = slide["slide_id"]
    return sid if file_stem(sid) == sid else file_stem(Path(slide["path"]).stem)


def level0_magnification(slide: dict):
    """Nominal objective of the scan: 10 / um per pixel where the scale is known, else the objective tag."""
    if slide.get("mpp_x"):
        return number(round(10.0 / float(slide["mpp_x"]), 3))
    return number(slide["objective"]) if slide.get("objective") else None


def target_magnification(spec: dict, slide: dict, patch_size: int, size: int):
    if spec.get("target_magnification") is not None:
        return number(spec["target_magnification"])
    if spec.get("target_mpp"):
        return number(round(10.0 / float(spec["target_mpp"]), 3))
    source = level0_magnification(slide)
    return number(round(source * patch_size / size, 3)) if source else None


def export_h5(ws: Workspace, view: FeatureView, out: Path | None = None, slide_ids: list[str] | None = None) -> H5Export:
    """Write one TRIDENT-layout file per done slide of ``view`` (default folder: outputs/exchange/h5/<view>)."""
    catalog = Catalog.of(ws)
    spec = view_spec(catalog, view)
    patch_size = int(spec.get("tile_px") or view.image_px)
    overlap = int(spec.get("overlap") or 0)
    encoder = encoder_name(view)
    root = Path(out) if out is not None else ws.outputs_dir / "exchange" / "h5" / view.view_id
    slides = exported_slides(ws, view, slide_ids)
    result: H5Export | None = None
    for st in slide_tiles(ws, view, slides):
        slide = st.slide
        target = target_magnification(spec, slide, patch_size, st.size)
        if result is None:  # TRIDENT's folder is per magnification, patch size and overlap: the spec's
            result = H5Export(root / f"{_mag_text(target)}x_{patch_size}px_{overlap}px_overlap" / f"features_{encoder}")
        name = slide_file_stem(slide)
        coords_attrs = {"patch_size": patch_size, "patch_size_level0": st.size,
                        "level0_magnification": level0_magnification(slide), "target_magnification": target,
                        "overlap": overlap, "name": name, "savetodir": str(result.folder.parent),
                        "level0_width": int(slide["width"]), "level0_height": int(slide["height"])}
        features_attrs = {"name": name, "savetodir": str(result.folder), "encoder": encoder}
        result.files.append(write_trident_file(result.folder / f"{name}.h5", st.vectors, st.xy, coords_attrs,
                                               features_attrs))
        result.tiles += len(st.tile_ids)
    log.info("view %s: %d slides, %d tiles written to %s", view.view_id, len(result.files), result.tiles, result.folder)
    return result
