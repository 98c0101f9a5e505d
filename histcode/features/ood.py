"""How far a slide lies from the training cohort in a feature view: an out-of-distribution score and flag.

A slide's score is the mean, over its tiles (at most ``tiles_per_slide``, sampled with the seed), of each tile's
mean cosine distance (1 - cos of L2-normalised vectors) to its k nearest reference tiles. The reference is a
sample of the training cohort's tiles (at most ``reference_tiles``, spread evenly over the training slides), each
tile remembering its patient. The same score of training slides, each against the reference without its own
patient's tiles (leave-one-patient-out, so a slide is never its own neighbour), calibrates the scale: a slide
above the ``quantile`` of those scores times ``margin`` lies outside the training distribution.

The nearest-neighbour search is exact and numpy only: query tiles in chunks against the whole reference, a matrix
product and a partial sort, so memory stays at one chunk x reference. Sampling is deterministic: the same vectors
and configuration give the same reference, threshold and scores. ``reference_for_view`` builds the reference of a
workspace's view from the training cohorts' tile vectors and caches it beside the outputs, keyed by what the view
holds for those slides and by the configuration.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histcode.config import OODConfig, stable_hash
from histcode.features.read import tile_features
from histcode.features.registry import FeatureView, training_state
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace, file_stem

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024  # query tiles per matrix product against the reference
SLIDE_CHUNK = 16  # training slides read from the view at a time
FORMAT = 1  # version of the saved .npz layout (part of the cache key)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (an all-zero row stays zero: distance 1 to everything)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def knn_distance(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Per query row, the mean cosine distance to its ``k`` nearest reference rows (both unit-normalised;
    ``k`` is capped at the reference size). Exact, in chunks of ``QUERY_CHUNK`` queries."""
    if len(reference) == 0:
        raise ValueError("the reference holds no tiles")
    k = min(k, len(reference))
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), QUERY_CHUNK):
        sims = queries[start:start + QUERY_CHUNK] @ reference.T
        top = -np.partition(-sims, k - 1, axis=1)[:, :k]  # the k largest similarities, unordered
        out[start:start + QUERY_CHUNK] = np.clip(1.0 - top.astype(np.float64), 0.0, 2.0).mean(axis=1)
    return out


def _rng(seed: int, salt: str | None = None) -> np.random.Generator:
    """A generator fixed by the seed (any int) and, optionally, a name (a slide id)."""
    entropy = [seed % 2**32]
    if salt is not None:
        entropy.append(zlib.crc32(salt.encode("utf-8", "surrogatepass")))
    return np.random.default_rng(entropy)


def sample_rows(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``limit`` of ``n`` rows, in ascending order: all of them when ``n <= limit``."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def even_quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Tiles to take from each slide so that at most ``total`` are taken, as evenly as the slides allow: a slide
    with fewer tiles than its share gives all of them and the rest is shared among the larger slides."""
    quotas, left = {}, total
    order = sorted(counts, key=lambda s: (counts[s], s))
    for i, sid in enumerate(order):
        share = -(-left // (len(order) - i))  # ceiling: the remainder goes to the larger slides
        quotas[sid] = min(counts[sid], share)
        left -= quotas[sid]
    return quotas


def calibration_ids(slide_ids: list[str], n: int, seed: int) -> list[str]:
    """The training slides scored for the calibration: at most ``n``, chosen with the seed, sorted."""
    ids = sorted(slide_ids)
    return [ids[i] for i in sample_rows(len(ids), n, _rng(seed, "calibration"))]


def check_features(features: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """``features`` as an (n_tiles, dim) float32 array, or a ValueError that names ``what`` (a slide) and what
    is wrong: not 2-d, no tiles, another dimension than ``dim``, non-finite vectors."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{what}: features must be a 2-d (tiles, dim) array, got shape {features.shape}")
    if len(features) == 0:
        raise ValueError(f"{what} has no tiles")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{what}: vectors of dim {features.shape[1]}, expected dim {dim}")
    features = features.astype(np.float32, copy=False)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} of {len(features)} tile vectors are not finite")
    return features


def _require_patients(patients: set[str]) -> None:
    if len(patients) < 2:
        raise ValueError(f"the training slides come from {len(patients)} patient(s): leave-one-patient-out "
                         "calibration needs at least 2")


@dataclass
class OODReference:
    """Training tiles of a view with their patients, and the leave-one-patient-out scores of training slides
    that calibrate the out-of-distribution threshold."""

    vectors: np.ndarray  # (n_ref, dim) float32, L2-normalised
    patients: np.ndarray  # (n_ref,) patient id of each reference tile
    calibration: np.ndarray  # calibration scores (leave-one-patient-out), sorted
    threshold: float
    k: int
    tiles_per_slide: int
    seed: int
    view_id: str = ""

    def score(self, features: np.ndarray, exclude_patient: str | None = None) -> float:
        """Mean over the slide's tiles (at most ``tiles_per_slide``, sampled with the seed) of the mean cosine
        distance to the k nearest reference tiles; ``exclude_patient``'s reference tiles are left out."""
        features = check_features(features, "the scored slide", self.vectors.shape[1])
        reference = self.vectors
        if exclude_patient is not None:
            reference = reference[self.patients != str(exclude_patient)]
            if len(reference) == 0:
                raise ValueError(f"no reference tiles are left once patient {exclude_patient!r} is excluded")
        rows = sample_rows(len(features), self.tiles_per_slide, _rng(self.seed))
        return float(knn_distance(normalize(features[rows]), reference, self.k).mean())

    def percentile(self, score: float) -> float:
        """Share of the calibration scores at or below ``score`` (0..1)."""
        return float(np.searchsorted(self.calibration, score, side="right") / len(self.calibration))

    def assess(self, features: np.ndarray) -> dict:
        """``ood_score``, its ``ood_percentile`` among the calibration scores and ``in_distribution``
        (False when the score is above the threshold)."""
        score = self.score(features)
        return {"ood_score": score, "ood_percentile": self.percentile(score),
                "in_distribution": bool(score <= self.threshold)}

    def save(self, path: Path) -> None:
        """One .npz file, written atomically (a temporary file in the same folder, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, format=np.int64(FORMAT), vectors=self.vectors.astype(np.float32),
                         patients=np.asarray(self.patients, dtype=str), calibration=self.calibration.astype(np.float64),
                         threshold=np.float64(self.threshold), k=np.int64(self.k),
                         tiles_per_slide=np.int64(self.tiles_per_slide), seed=np.int64(self.seed),
                         view_id=np.str_(self.view_id))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> OODReference:
        """A reference saved by ``save``; a ValueError names the file when it is not one."""
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                if int(data["format"]) != FORMAT:
                    raise ValueError(f"layout {int(data['format'])}, expected {FORMAT}")
                return cls(vectors=data["vectors"].astype(np.float32), patients=data["patients"],
                           calibration=data["calibration"], threshold=float(data["threshold"]), k=int(data["k"]),
                           tiles_per_slide=int(data["tiles_per_slide"]), seed=int(data["seed"]),
                           view_id=str(data["view_id"]))
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is not a readable OOD reference: {exc}") from exc


def _assemble(reference: list[tuple[str, np.ndarray]], calibration: list[tuple[str, str, np.ndarray]],
              cfg: OODConfig, view_id: str) -> OODReference:
    """The reference from per-slide (patient, sampled tiles), calibrated on (slide, patient, tiles) scored
    leave-one-patient-out."""
    vectors = np.concatenate([normalize(v) for _, v in reference]) if reference else np.empty((0, 0), np.float32)
    patients = np.repeat(np.asarray([p for p, _ in reference], dtype=str), [len(v) for _, v in reference])
    ref = OODReference(vectors, patients, np.empty(0), float("nan"), cfg.k, cfg.tiles_per_slide, cfg.seed, view_id)
    scores = []
    for sid, patient, tiles in calibration:
        if not (patients != patient).any():
            log.warning("OOD calibration skips slide %s: the reference holds only its own patient's tiles", sid)
            continue
        scores.append(ref.score(tiles, exclude_patient=patient))
    if not scores:
        raise ValueError("no training slide could be scored against other patients' tiles for the calibration")
    ref.calibration = np.sort(np.asarray(scores, dtype=np.float64))
    ref.threshold = float(np.quantile(ref.calibration, cfg.quantile) * cfg.margin)
    log.info("OOD reference%s: %d tiles of %d slides, %d calibration slides, threshold %.4f",
             f" of view {view_id}" if view_id else "", len(vectors), len(reference), len(scores), ref.threshold)
    return ref


def build_reference(slides: dict[str, tuple[str, np.ndarray]], cfg: OODConfig, view_id: str = "") -> OODReference:
    """The reference of training ``slides`` (slide id -> (patient id, (n_tiles, dim) features)), calibrated
    leave-one-patient-out. A ValueError names the slide with no tiles, another dimension or non-finite vectors,
    or says that fewer than 2 patients were given."""
    if not slides:
        raise ValueError("no training slides to build an OOD reference from")
    ids = sorted(slides)
    dim = None
    checked = {}
    for sid in ids:
        patient, features = slides[sid]
        checked[sid] = str(patient), check_features(features, f"slide {sid!r}", dim)
        dim = checked[sid][1].shape[1]
    _require_patients({p for p, _ in checked.values()})
    quotas = even_quotas({sid: len(f) for sid, (_, f) in checked.items()}, cfg.reference_tiles)
    reference = []
    for sid in ids:
        patient, features = checked[sid]
        if quotas[sid]:
            reference.append((patient, features[sample_rows(len(features), quotas[sid], _rng(cfg.seed, sid))]))
    calibration = [(sid, *checked[sid]) for sid in calibration_ids(ids, cfg.calibration_slides, cfg.seed)]
    return _assemble(reference, calibration, cfg, view_id)


def cache_path(ws: Workspace, view: FeatureView, state: list[tuple[str, str, int]], cfg: OODConfig) -> Path:
    """Where the reference of ``view`` for this training state and configuration is cached."""
    key = stable_hash({"format": FORMAT, "view": view.view_id, "state": state,
                       "ood": cfg.model_dump(mode="json", exclude={"enabled"})}, 12)
    return ws.outputs_dir / "ood" / f"{file_stem(view.view_id)}-{key}.npz"


def _read_slides(ws: Workspace, view: FeatureView, slide_ids: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(slide, patient, tile vectors in (y, x) order) for each of ``slide_ids``; a slide the table has no rows
    for comes back with no tiles. The patient is the slide itself where the table has none."""
    data = tile_features(ws, view, slide_ids=slide_ids, fmt="arrow")
    data = data.select(["slide_id", "patient_id", "x", "y", "vector"])
    data = data.sort_by([("slide_id", "ascending"), ("y", "ascending"), ("x", "ascending")])
    if data.num_rows == 0:
        vectors, patients, bounds = np.empty((0, view.dim), np.float32), [], {}
    else:
        vectors = data.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = vectors.reshape(data.num_rows, view.dim)
        sids = data.column("slide_id").to_numpy(zero_copy_only=False)
        patients = data.column("patient_id").to_pylist()
        cuts = np.flatnonzero(sids[1:] != sids[:-1]) + 1  # rows are grouped by slide after the sort
        bounds = {sids[lo]: (int(lo), int(hi)) for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(sids)])}
    for sid in slide_ids:
        lo, hi = bounds.get(sid, (0, 0))
        patient = patients[lo] if hi > lo and patients[lo] is not None else sid
        yield sid, str(patient), vectors[lo:hi]


def _reference_from_view(ws: Workspace, view: FeatureView, state: list[tuple[str, str, int]],
                         cfg: OODConfig) -> OODReference:
    """The reference of the training slides in ``state``, read ``SLIDE_CHUNK`` slides at a time; only the
    sampled tiles of each slide are kept."""
    counts = {sid: rows for sid, _, rows in state}
    quotas = even_quotas(counts, cfg.reference_tiles)
    scored = set(calibration_ids(list(counts), cfg.calibration_slides, cfg.seed))
    ids = sorted(counts)
    reference, calibration, patients = [], [], set()
    for start in range(0, len(ids), SLIDE_CHUNK):
        for sid, patient, vectors in _read_slides(ws, view, ids[start:start + SLIDE_CHUNK]):
            vectors = check_features(vectors, f"slide {sid!r} in view {view.view_id}", view.dim)
            patients.add(patient)
            quota = min(quotas[sid], len(vectors))
            if quota:
                reference.append((patient, vectors[sample_rows(len(vectors), quota, _rng(cfg.seed, sid))]))
            if sid in scored:  # the tiles ``score`` would sample from the whole slide
                rows = sample_rows(len(vectors), cfg.tiles_per_slide, _rng(cfg.seed))
                calibration.append((sid, patient, vectors[rows]))
    _require_patients(patients)
    return _assemble(reference, calibration, cfg, view.view_id)


def reference_for_view(ws: Workspace, catalog: Catalog, view: FeatureView, cohorts: list[str],
                       cfg: OODConfig) -> OODReference:
    """The OOD reference of ``view`` over the training ``cohorts``' slides it has materialised: loaded from the
    cache when one matches what the view holds for those slides and ``cfg``, otherwise built and cached."""
    state = training_state(catalog, view, cohorts)
    if not state:
        raise ValueError(f"view {view.view_id} holds no vectors of the training cohorts {cohorts}: run `histcode embed`")
    path = cache_path(ws, view, state, cfg)
    if path.exists():
        try:
            reference = OODReference.load(path)
            log.info("OOD reference of view %s loaded from %s", view.view_id, path)
            return reference
        except ValueError as exc:
            log.warning("rebuilding the OOD reference: %s", exc)
    reference = _reference_from_view(ws, view, state, cfg)
    reference.save(path)
    for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.npz"):  # earlier states of this view
        if stale != path:
            stale.unlink(missing_ok=True)
    return reference


__all__ = ["OODReference", "build_reference", "cache_path", "knn_distance", "reference_for_view"]
