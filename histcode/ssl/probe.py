"""Linear probe: how much tissue-class information a frozen encoder's embeddings carry, told apart from noise.

Held-aside labelled tiles (LC25000's ``val`` split: benign lung, adenocarcinoma, squamous carcinoma; never
placed on a demo slide) are split once, by LC25000 ``group_id`` (near-copies of one photograph stay together)
and stratified by class, into a **tuning half** and a **reporting half** (``probe.split_seed``): settings are
chosen on the tuning half only (``benchmarks/ssl_sweep.py``), and the figures that are reported come from the
reporting half, which no choice has read. On each half, three tasks (``TASKS``): ``tissue`` (the 3 classes,
macro one-vs-rest AUC), ``tumour`` (carcinoma vs benign) and ``subtype`` (adenocarcinoma vs squamous, on the
carcinoma tiles: the task that is not saturated), each a logistic regression cross-validated with folds grouped
by ``group_id``; pooled out-of-fold predictions give AUC and accuracy. Three feature sets side by side: the
trained encoder, the same architecture at its random initialisation, and mean/std colour (benign LC25000 tiles
are visibly pinker, and colour alone goes a long way; it also keeps brightness, how airy the tissue is: a real
structural cue). Everything is measured twice: on the tiles as they are and on the same tiles re-stained
(``restained``: a random H&E stain per tile in optical-density space), which a stain-robust encoder must
survive. On the reporting half, the gains trained - random init and trained - colour come with paired,
group-resampled 95% intervals (``histcode.ssl.probe_stats``).

Metric names: ``probe/<half>/<task>[/restained]/<features>_auc`` (and ``_accuracy``), ``<features>`` one of
``trained``, ``random_init``, ``colour``; gains ``probe/report/<task>[/restained]/gain_vs_<random_init|colour>``
with ``_ci_low`` and ``_ci_high``; ``probe/<half>/tiles``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histcode.config import ProbeConfig
from histcode.ssl.probe_stats import auc, paired_difference
from histcode.wsi.stain import jitter_stain, restain


@dataclass(frozen=True)
class ProbeSet:
    images: torch.Tensor  # uint8 (N, 3, px, px)
    labels: np.ndarray  # int (N,)
    groups: np.ndarray  # str (N,)
    classes: tuple[str, ...]


def load_probe_set(source_dir: Path, split: str, image_px: int) -> ProbeSet:
    labels_csv = source_dir / "labels.csv"
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv}: the linear probe needs labelled tiles (LC25000 labels.csv)")
    with labels_csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    if not rows:
        raise ValueError(f"{labels_csv}: no tiles in split {split!r}")
    classes = tuple(sorted({r["label"] for r in rows}))
    images = []
    for r in rows:
        with Image.open(source_dir / r["path"]) as im:
            im = im.convert("RGB").resize((image_px, image_px), Image.Resampling.BOX)
            images.append(torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()))
    return ProbeSet(
        images=torch.stack(images),
        labels=np.array([classes.index(r["label"]) for r in rows]),
        groups=np.array([r["group_id"] for r in rows]),
        classes=classes,
    )


def restained(images: torch.Tensor, cfg: ProbeConfig, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, h, w) tiles, each re-stained with its own random stain (log-normal concentration stretches
    of sd ``stain_log_sd``, vector turns up to ``stain_angle`` degrees), reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    out = torch.empty_like(images)
    for i in range(len(images)):
        rgb = images[i].numpy().transpose(1, 2, 0)
        stain = jitter_stain(rng, cfg.stain_log_sd, cfg.stain_angle)
        out[i] = torch.from_numpy(np.ascontiguousarray(restain(rgb, stain).transpose(2, 0, 1)))
    return out


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Features of uint8 images with the encoder in eval mode: (N, D) float32."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 255.0
        out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(out).numpy()


def colour_features(images: torch.Tensor) -> np.ndarray:
    """Per-channel mean and standard deviation: the colour-only baseline."""
    x = images.float() / 255.0
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).numpy()


HALVES = ("tune", "report")
FEATURES = ("trained", "random_init", "colour")
BENIGN = "lung_n"  # LC25000's benign lung; the other classes are carcinomas
SQUAMOUS = "lung_scc"


@dataclass(frozen=True)
class Task:
    name: str
    rows: np.ndarray  # probe-set rows the task uses
    y: np.ndarray  # class ids of those rows


def tasks(probe: ProbeSet) -> list[Task]:
    """The probe's tasks on its tiles: the 3 classes, carcinoma vs benign, squamous vs adenocarcinoma."""
    every = np.arange(len(probe.labels))
    names = np.array(probe.classes)[probe.labels]
    tumour = np.flatnonzero(names != BENIGN)
    return [Task("tissue", every, probe.labels),
            Task("tumour", every, (names != BENIGN).astype(int)),
            Task("subtype", tumour, (names[tumour] == SQUAMOUS).astype(int))]


def split_halves(probe: ProbeSet, seed: int) -> dict[str, np.ndarray]:
    """The fixed split of the probe's tiles into a tuning and a reporting half: whole groups, stratified by
    class (rows of each half, sorted)."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    tune, report = next(splitter.split(np.zeros(len(probe.labels)), probe.labels, probe.groups))
    return {"tune": np.sort(tune), "report": np.sort(report)}


def out_of_fold(features: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: ProbeConfig,
                seed: int = 0) -> np.ndarray:
    """Pooled out-of-fold class probabilities (n, classes) of a grouped, stratified K-fold logistic regression
    on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proba = np.zeros((len(y), int(y.max()) + 1))
    splits = min(cfg.folds, len(np.unique(groups)))
    for train, test in StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed).split(features, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.max_iter, C=1.0))
        model.fit(features[train], y[train])
        proba[np.ix_(test, model.classes_)] = model.predict_proba(features[test])
    return proba


def probe_report(features: dict[str, dict[str, np.ndarray]], probe: ProbeSet, cfg: ProbeConfig,
                 seed: int = 0) -> dict[str, float]:
    """Every half x task x image set x feature set, and the reporting half's paired gains. ``features``: image
    set ("" as they are, "/restained") -> feature set name (``FEATURES``) -> (N, D) features of the probe tiles."""
    out: dict[str, float] = {}
    for half, rows in split_halves(probe, cfg.split_seed).items():
        out[f"probe/{half}/tiles"] = float(len(rows))
        for task in tasks(probe):
            use = np.intersect1d(task.rows, rows)
            y = task.y[np.searchsorted(task.rows, use)]
            groups = probe.groups[use]
            for suffix, sets in features.items():
                key = f"probe/{half}/{task.name}{suffix}"
                proba = {name: out_of_fold(f[use], y, groups, cfg, seed) for name, f in sets.items()}
                for name, p in proba.items():
                    out[f"{key}/{name}_auc"] = auc(y, p)
                    out[f"{key}/{name}_accuracy"] = float((p.argmax(axis=1) == y).mean())
                if half != "report" or "trained" not in proba:
                    continue
                for other in (n for n in proba if n != "trained"):
                    d, lo, hi = paired_difference(y, groups, proba["trained"], proba[other], cfg.bootstrap, seed)
                    out[f"{key}/gain_vs_{other}"] = d
                    out[f"{key}/gain_vs_{other}_ci_low"], out[f"{key}/gain_vs_{other}_ci_high"] = lo, hi
    out["probe_tiles"] = float(len(probe.labels))
    return out
