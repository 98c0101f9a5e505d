"""Synthetic embeddings for the search benchmark: clustered, isotropic, or drawn from a model of real tile
embeddings' statistics.

The real-statistics model is fitted to a feature view's tile vectors: k-means centres (the tissue types and
stains a view separates) with their frequencies, plus one within-cluster covariance (the pooled residuals), so
that samples have the real vectors' mean, eigenspectrum and cluster structure. It is checked against the real
vectors on measures that decide how hard nearest-neighbour search is, at the real sample's size: the local
intrinsic dimensionality (LID, maximum-likelihood estimate over the 20 nearest neighbours, Levina & Bickel 2004)
and the relative contrast (mean distance over the mean distance to the 10th neighbour, He et al. 2012).
Two models ship in ``benchmarks/data/``, fitted to the demo's AdCo views (``python benchmarks/search.py
--fit-from WORKSPACE_OR_TABLE``): ``demo_resnet18_512d.npz`` (ResNet-18, 512-d) and ``demo_resnet18_l3_256d.npz``
(the default encoder, 256-d).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
STATS = {512: DATA / "demo_resnet18_512d.npz", 256: DATA / "demo_resnet18_l3_256d.npz"}


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Gaussian clusters with noise as large as the cluster offsets; ``clusters=0``: isotropic Gaussian
    vectors, the hardest case for any ANN index."""
    centers = rng.normal(size=(max(clusters, 1), dim)).astype(np.float32) * (1.0 if clusters else 0.0)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centers[rng.integers(0, max(clusters, 1), stop - start)] + rng.normal(
            scale=1.0, size=(stop - start, dim)).astype(np.float32)
    return out


def hardness(x: np.ndarray, k: int = 20) -> tuple[float, float]:
    """(median LID over the k nearest neighbours, relative contrast at the 10th) under cosine distance."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.clip(2.0 - 2.0 * (u @ u.T), 0.0, None))
    np.fill_diagonal(d, np.inf)
    near = np.sort(d, axis=1)[:, :k]
    lid = -1.0 / np.mean(np.log(near[:, :-1] / near[:, -1:]), axis=1)
    return float(np.median(lid)), float(d[np.isfinite(d)].mean() / near[:, 9].mean())


def fit_statistics(real: np.ndarray, clusters: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.cluster import KMeans

    real = np.asarray(real, dtype=np.float64)
    km = KMeans(clusters, n_init=4, random_state=seed).fit(real)
    residual = real - km.cluster_centers_[km.labels_]
    eigvals, eigvecs = np.linalg.eigh(residual.T @ residual / max(1, len(real) - clusters))
    lid, contrast = hardness(real.astype(np.float32))
    return {"centres": km.cluster_centers_.astype(np.float32),
            "weights": (np.bincount(km.labels_, minlength=clusters) / len(real)).astype(np.float64),
            "scales": np.sqrt(np.clip(eigvals, 0.0, None)).astype(np.float32), "basis": eigvecs.astype(np.float32),
            "real_n": np.int64(len(real)), "real_lid": np.float64(lid), "real_contrast": np.float64(contrast)}


def load_statistics(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"no embedding statistics at {path}: fit them with "
                                "`python benchmarks/search.py --fit-from WORKSPACE_OR_TABLE`")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def from_statistics(rng: np.random.Generator, stats: dict[str, np.ndarray], n: int) -> np.ndarray:
    centres, basis, scales = stats["centres"], stats["basis"].astype(np.float32), stats["scales"].astype(np.float32)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        which = rng.choice(len(centres), stop - start, p=stats["weights"])
        noise = rng.standard_normal((stop - start, centres.shape[1]), dtype=np.float32) * scales
        out[start:stop] = centres[which] + noise @ basis.T
    return out


def real_vectors(source: Path) -> np.ndarray:
    """Tile vectors of a Lance table (a ``tile_emb__*.lance`` folder), or of a workspace's default view."""
    import lance

    from histcode.features.retrieval import vector_matrix

    path = source
    if not source.name.endswith(".lance"):
        from histcode.features.read import view_table
        from histcode.features.registry import resolve_view
        from histcode.store.catalog import Catalog
        from histcode.store.vectors import TILE_KIND
        from histcode.tracking import Tracker
        from histcode.workspace import Workspace

        ws = Workspace(source)
        cfg = ws.config()
        view = resolve_view(Catalog.of(ws), Tracker(ws), cfg, cfg.heads.view)
        return vector_matrix(view_table(ws, view, TILE_KIND).to_lance().to_table(columns=["vector"]))
    return vector_matrix(lance.dataset(str(path)).to_table(columns=["vector"]))
