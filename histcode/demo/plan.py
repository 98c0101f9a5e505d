"""The demo cohort's plan: patients, their slides, and which real tiles each patient may use.

LC25000 tiles come in groups of near-copies (augmentations of one 768 px original), so tiles are dealt to
patients by ``group_id``: a group's tiles never appear in two patients, and cross-validation by patient can
never see the same tissue twice. Only the ``train`` split is used; the ``val`` split stays aside for the
linear probe of the encoders.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histcode.config import DemoConfig

CLASSES = ("lung_n", "lung_aca", "lung_scc")
SUBTYPE_CLASS = {"LUAD": "lung_aca", "LUSC": "lung_scc"}
TSS = "HC"  # the tissue-source-site code of the simulated barcodes


class DemoSourceError(ValueError):
    """The LC25000 source folder is missing or malformed."""


@dataclass(frozen=True)
class SourceTile:
    path: Path
    label: str
    group_id: str


@dataclass(frozen=True)
class SlidePlan:
    slide_id: str
    patient_id: str
    sample_type: str  # tumor | normal
    subtype: str  # LUAD | LUSC (the patient's; the slide shows it only if tumour)
    fmt: str  # aperio | generic-tiff
    magnification: int  # 20 | 40
    tumour_fraction: float  # target share of tissue cells that hold tumour tiles
    coverage: float  # target share of the canvas covered by tissue
    seed: int

    @property
    def mpp(self) -> float:
        return 0.5 * 20 / self.magnification

    @property
    def filename(self) -> str:
        return f"{self.slide_id}.svs" if self.fmt == "aperio" else f"{self.slide_id}.tif"


def load_source_tiles(source_dir: Path, split: str = "train") -> list[SourceTile]:
    labels = source_dir / "labels.csv"
    if not labels.is_file():
        raise DemoSourceError(f"{labels}: not found; the demo needs the LC25000 lung tiles with their labels.csv")
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"path", "label", "group_id", "split"}
    if not rows or not need <= set(rows[0]):
        raise DemoSourceError(f"{labels}: needs columns {sorted(need)}")
    tiles = [SourceTile(source_dir / r["path"], r["label"], r["group_id"]) for r in rows if r["split"] == split]
    missing = [t.path for t in tiles if not t.path.is_file()]
    if missing:
        raise DemoSourceError(f"{len(missing)} tiles listed in {labels} are missing, e.g. {missing[0]}")
    found = {t.label for t in tiles}
    if not set(CLASSES) <= found:
        raise DemoSourceError(f"{labels}: needs classes {CLASSES} in the {split} split, found {sorted(found)}")
    return tiles


def deal_groups(tiles: list[SourceTile], owners: list[str], rng: np.random.Generator) -> dict[str, list[SourceTile]]:
    """Shuffle the tiles' groups and deal them round-robin to ``owners``; every owner gets whole groups."""
    groups: dict[str, list[SourceTile]] = defaultdict(list)
    for t in tiles:
        groups[t.group_id].append(t)
    names = sorted(groups)
    rng.shuffle(names)
    pools: dict[str, list[SourceTile]] = {o: [] for o in owners}
    for i, name in enumerate(names):
        pools[owners[i % len(owners)]].extend(groups[name])
    return pools


def plan_cohort(cfg: DemoConfig, tiles: list[SourceTile]) -> tuple[list[SlidePlan], dict[str, dict[str, list[SourceTile]]]]:
    """Slides to build and, per patient, its 'normal' and 'tumour' tile pools."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_patients
    patients = [f"TCGA-{TSS}-{i:04d}" for i in range(1, n + 1)]
    n_luad = int(round(n * cfg.luad_fraction))
    subtypes = np.array(["LUAD"] * n_luad + ["LUSC"] * (n - n_luad))
    rng.shuffle(subtypes)
    subtype_of = dict(zip(patients, subtypes.tolist()))
    with_normal = set(rng.choice(patients, size=int(round(n * cfg.matched_normal_fraction)), replace=False).tolist())

    by_class: dict[str, list[SourceTile]] = defaultdict(list)
    for t in tiles:
        by_class[t.label].append(t)
    need = {"lung_n": n, "lung_aca": int((subtypes == "LUAD").sum()), "lung_scc": int((subtypes == "LUSC").sum())}
    for label, patients_needing in need.items():
        groups = len({t.group_id for t in by_class[label]})
        if groups < patients_needing:
            raise DemoSourceError(
                f"{patients_needing} patients need {label} tiles but the source has only {groups} {label} groups "
                f"(near-copies cannot be shared between patients); lower demo.n_patients"
            )
    normal_pools = deal_groups(by_class["lung_n"], patients, rng)
    pools: dict[str, dict[str, list[SourceTile]]] = {p: {"normal": normal_pools[p]} for p in patients}
    for subtype, label in SUBTYPE_CLASS.items():
        owners = [p for p in patients if subtype_of[p] == subtype]
        if owners:
            for p, pool in deal_groups(by_class[label], owners, rng).items():
                pools[p]["tumour"] = pool

    slides: list[tuple[str, str]] = []
    for p in patients:
        slides.append((p, "tumor"))
        if p in with_normal:
            slides.append((p, "normal"))
    count = len(slides)
    n40 = int(round(count * cfg.fraction_40x))
    ngen = int(round(count * cfg.fraction_generic_tiff))
    formats = np.array(["aperio40"] * n40 + ["generic"] * ngen + ["aperio20"] * (count - n40 - ngen))
    rng.shuffle(formats)
    seeds = rng.integers(0, 2**31 - 1, size=count)
    lo, hi = cfg.tumour_fraction
    plans = []
    for (p, kind), fmt, seed in zip(slides, formats, seeds):
        code = "01Z" if kind == "tumor" else "11Z"
        plans.append(
            SlidePlan(
                slide_id=f"{p}-{code}-00-DX1",
                patient_id=p,
                sample_type=kind,
                subtype=subtype_of[p],
                fmt="generic-tiff" if fmt == "generic" else "aperio",
                magnification=40 if fmt == "aperio40" else 20,
                tumour_fraction=float(rng.uniform(lo, hi)) if kind == "tumor" else 0.0,
                coverage=float(rng.uniform(0.4, 0.6)),
                seed=int(seed),
            )
        )
    return plans, pools


def sample_barcode(patient_id: str, sample_type: str) -> str:
    """TCGA-style aliquot barcode: sample type 01 (primary tumour) or 11 (solid tissue normal), RNA analyte."""
    code = "01A" if sample_type == "tumor" else "11A"
    return f"{patient_id}-{code}-01R-{TSS}01-07"
