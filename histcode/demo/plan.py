"""The demo cohort's plan: patients, their slides, and which real tiles each patient may use.

LC25000 tiles come in groups of near-copies (augmentations of one 768 px original), so tiles are dealt to
patients by ``group_id``: a group's tiles never appear in two patients, and cross-validation by patient can
never see the same tissue twice. Only the ``train`` split is used; the ``val`` split stays aside for the
linear probe of the encoders. Patients belong to tissue-source sites (the barcode's TSS field), each with its
own stain, dealt evenly over each subtype so that the site says nothing of the class; a random share of the
tumour slides hold only a small focus.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histcode.config import DemoConfig
from histcode.demo.pixels import SourceMeasures, group_measures
from histcode.wsi.stain import StainParams, draw_stain

CLASSES = ("lung_n", "lung_aca", "lung_scc")
SUBTYPE_CLASS = {"LUAD": "lung_aca", "LUSC": "lung_scc"}
TSS = "HC"  # the default tissue-source-site code of a plan


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
    tumour_fraction: float  # target share of the tissue that holds tumour tiles
    coverage: float  # target share of the canvas covered by tissue
    seed: int
    site: str = TSS  # tissue-source site (the barcode's TSS field)
    small_focus: bool = False  # the tumour is one small focus
    site_stain: StainParams = StainParams()  # the site's stain
    stain: StainParams = StainParams()  # this slide's: the site's with a per-slide jitter on top

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


def deal_by_phenotype(tiles: list[SourceTile], owners: list[str], keys: dict[str, tuple[float, float]],
                      rng: np.random.Generator) -> dict[str, list[SourceTile]]:
    """Deal whole groups so that each owner's pool spans a narrow range of two measured ``keys`` per group.

    Owners are split into about sqrt(n) strata; groups sorted by the first key (plus a little noise) are cut
    into one block per stratum, each block sorted by the second key and cut into one chunk per owner. So
    patients differ in their tumours' nuclear density and size as real patients do, each with its own range.
    """
    groups: dict[str, list[SourceTile]] = defaultdict(list)
    for t in tiles:
        groups[t.group_id].append(t)
    names = sorted(groups)
    order = [owners[i] for i in rng.permutation(len(owners))]
    n_strata = max(1, int(round(np.sqrt(len(order)))))
    strata = [list(part) for part in np.array_split(np.array(order, dtype=object), n_strata)]
    noise = rng.normal(0, 0.25, size=(len(names), 2))
    first = [names[i] for i in np.argsort([keys[n][0] + noise[i, 0] for i, n in enumerate(names)], kind="stable")]
    jitter = {n: noise[i, 1] for i, n in enumerate(names)}
    cuts = np.cumsum([0] + [len(st) for st in strata]) * len(first) // len(order)
    pools: dict[str, list[SourceTile]] = {o: [] for o in owners}
    for stratum, lo, hi in zip(strata, cuts[:-1], cuts[1:]):
        block = sorted(first[lo:hi], key=lambda n: keys[n][1] + jitter[n])
        for owner, chunk in zip(stratum, np.array_split(np.array(block, dtype=object), len(stratum))):
            for name in chunk:
                pools[owner].extend(groups[name])
    return pools


def _patients(cfg: DemoConfig, rng: np.random.Generator) -> tuple[list[str], dict[str, str]]:
    """Patient barcodes ``TCGA-<site>-<code>`` and their subtypes.

    Participant codes are random 4-digit numbers (distinct, so two cohorts of other seeds rarely share one).
    Sites are dealt round-robin over the patients of each subtype in turn (a random order within each), so
    every site holds both subtypes in about equal numbers: the site, and with it the stain, says nothing of
    the class. The first site always holds a patient.
    """
    n = cfg.n_patients
    codes = rng.choice(np.arange(1, 10000), size=n, replace=False)
    n_luad = int(round(n * cfg.luad_fraction))
    subtypes = np.array(["LUAD"] * n_luad + ["LUSC"] * (n - n_luad))
    rng.shuffle(subtypes)
    site_at: dict[int, str] = {}
    k = 0
    for subtype in ("LUAD", "LUSC"):
        members = np.flatnonzero(subtypes == subtype)
        for i in members[rng.permutation(len(members))]:
            site_at[int(i)] = cfg.sites[k % len(cfg.sites)]
            k += 1
    patients = [f"TCGA-{site_at[i]}-{codes[i]:04d}" for i in range(n)]
    return patients, dict(zip(patients, subtypes.tolist()))


def plan_cohort(cfg: DemoConfig, tiles: list[SourceTile], measures: SourceMeasures | None = None
                ) -> tuple[list[SlidePlan], dict[str, dict[str, list[SourceTile]]]]:
    """Slides to build and, per patient, its 'normal' and 'tumour' tile pools (tumour pools dealt by measured
    phenotype when ``measures`` are given, else at random)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_patients
    patients, subtype_of = _patients(cfg, rng)
    subtypes = np.array([subtype_of[p] for p in patients])
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
            if measures is not None:
                dealt = deal_by_phenotype(by_class[label], owners, group_measures(by_class[label], measures), rng)
            else:
                dealt = deal_groups(by_class[label], owners, rng)
            for p, pool in dealt.items():
                pools[p]["tumour"] = pool

    site_stain = {s: draw_stain(rng, cfg.stain_site_angle, cfg.stain_site_scale) for s in cfg.sites}
    small = set(rng.choice(patients, size=int(round(n * cfg.small_focus_share)), replace=False).tolist())
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
    plans = []
    for (p, kind), fmt, seed in zip(slides, formats, seeds):
        code = "01Z" if kind == "tumor" else "11Z"
        focus = kind == "tumor" and p in small
        lo, hi = cfg.small_focus_fraction if focus else cfg.tumour_fraction
        site = site_of(p)
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
                site=site,
                small_focus=focus,
                site_stain=site_stain[site],
                stain=site_stain[site].then(draw_stain(rng, cfg.stain_slide_angle, cfg.stain_slide_scale)),
            )
        )
    return plans, pools


def site_of(patient_id: str) -> str:
    """The tissue-source site of a ``TCGA-<site>-<code>`` barcode."""
    return patient_id.split("-")[1]


def sample_barcode(patient_id: str, sample_type: str) -> str:
    """TCGA-style aliquot barcode: sample type 01 (primary tumour) or 11 (solid tissue normal), RNA analyte,
    plate ``<site>01``, centre 07."""
    code = "01A" if sample_type == "tumor" else "11A"
    return f"{patient_id}-{code}-01R-{site_of(patient_id)}01-07"
