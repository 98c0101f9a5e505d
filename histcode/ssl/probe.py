"""Linear probe: how much tissue-class information a frozen encoder's embeddings carry.

Held-aside labelled tiles (LC25000's ``val`` split: benign lung, adenocarcinoma, squamous carcinoma; never
placed on a demo slide) are embedded, and a logistic regression is cross-validated on them with folds grouped
by LC25000 ``group_id`` (near-copies never straddle a fold). Reported: 3-class accuracy and macro one-vs-rest
AUC of the pooled out-of-fold predictions. A mean/std-colour baseline is reported beside it, because benign
LC25000 tiles are visibly pinker than tumour ones and colour alone goes a long way (it also keeps brightness,
how airy the tissue is: a real structural cue). Everything is measured twice: on the tiles as they are and on
the same tiles re-stained (``restained``: a random H&E stain per tile in optical-density space), which is
what a stain-robust encoder must survive.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histcode.config import ProbeConfig
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


def linear_probe(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, cfg: ProbeConfig, seed: int = 0) -> dict[str, float]:
    """Grouped K-fold logistic regression on standardised features: pooled accuracy and macro AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = int(labels.max()) + 1
    proba = np.zeros((len(labels), n_classes))
    folds = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
    for train, test in folds.split(features, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.max_iter, C=1.0))
        model.fit(features[train], labels[train])
        proba[test] = model.predict_proba(features[test])
    return {
        "accuracy": float(accuracy_score(labels, proba.argmax(axis=1))),
        "macro_auc": float(roc_auc_score(labels, proba, multi_class="ovr", average="macro")),
    }
