"""Feature files of TRIDENT and CLAM: one HDF5 file per slide, named by the slide's file stem.

Both tools write two datasets (TRIDENT ``trident/wsi_objects/WSI.py:extract_patch_features`` with
``trident/IO.py:save_h5``; CLAM ``extract_features_fp.py`` with ``utils/file_utils.py:save_hdf5``):

- ``features``: (N, D) float32, one row per patch;
- ``coords``: (N, 2) integers, each patch's top-left corner in level-0 pixels (TRIDENT int64, CLAM int32).

TRIDENT puts the grid on the ``coords`` attributes (``patch_size`` at the target magnification,
``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
``level0_height``, ``name``) and the encoder on the ``features`` attributes (``encoder``, ``name``); it
serialises None as the string ``'None'``. CLAM's feature files carry no attributes at all: the grid
(``patch_size`` and ``patch_level``, pixels read at that pyramid level) is on the ``coords`` of the patch file
``create_patches_fp.py`` wrote (``<patches dir>/<stem>.h5``), and the encoder is ``--model_name`` of the run.

This module reads and writes the files; it knows nothing of the stores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histcode.errors import HistcodeError, require


class ExchangeError(HistcodeError, ValueError):
    """A file HistCode cannot import or write (its shapes, attributes or slide do not fit); the message names the
    file and the reason."""


def h5py():
    """h5py, or MissingExtra naming the ``exchange`` extra."""
    return require("h5py", "exchange", "reading and writing TRIDENT/CLAM .h5 and AnnData .h5ad files")


def plain(value):
    """An HDF5 attribute as plain Python: bytes decoded, numpy scalars and arrays unwrapped, TRIDENT's 'None'
    string as None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value == "None":
        return None
    return value


@dataclass
class FeatureFile:
    """One slide's patches as a file holds them (shapes not yet checked)."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    coords_attrs: dict = field(default_factory=dict)
    features_attrs: dict = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.path.stem


def read_feature_file(path: Path) -> FeatureFile:
    """The ``features`` and ``coords`` datasets with their attributes; ExchangeError naming the file when it is
    not HDF5 or lacks either dataset."""
    lib = h5py()
    try:
        with lib.File(path, "r") as f:
            missing = [name for name in ("features", "coords") if name not in f]
            if missing:
                raise ExchangeError(f"{path.name}: no {' or '.join(missing)} dataset (has: {', '.join(f) or 'nothing'})")
            features, coords = f["features"], f["coords"]
            return FeatureFile(path, features[()], coords[()], {k: plain(v) for k, v in coords.attrs.items()},
                               {k: plain(v) for k, v in features.attrs.items()})
    except ExchangeError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:  # h5py: not HDF5, truncated, unreadable
        raise ExchangeError(f"{path.name}: not a readable HDF5 feature file ({exc})") from exc


def read_coords_attrs(path: Path) -> dict:
    """The ``coords`` attributes of a patch file (CLAM's ``patches/<stem>.h5``); {} when it has no coords."""
    lib = h5py()
    try:
        with lib.File(path, "r") as f:
            return {k: plain(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ExchangeError(f"{path.name}: not a readable HDF5 patch file ({exc})") from exc


def write_trident_file(path: Path, features: np.ndarray, coords: np.ndarray, coords_attrs: dict,
                       features_attrs: dict) -> Path:
    """One slide in TRIDENT's layout (``features`` float32 (N, D), ``coords`` int64 (N, 2), the attributes as
    TRIDENT writes them, None as 'None'), written to a temporary name and renamed, so a reader never finds half a
    file."""
    lib = h5py()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with lib.File(tmp, "w") as f:
            for name, data, attrs in (("features", np.asarray(features, np.float32), features_attrs),
                                      ("coords", np.asarray(coords, np.int64), coords_attrs)):
                dset = f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]),
                                        chunks=(max(1, min(len(data), 1024)), *data.shape[1:]))
                for key, value in attrs.items():
                    dset.attrs[key] = "None" if value is None else value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
