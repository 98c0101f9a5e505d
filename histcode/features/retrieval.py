"""Slide retrieval as the field scores it: leave-one-patient-out nearest slides, majority vote and mAP at k.

Centring. A slide vector is the mean of its tiles' vectors, so every slide vector carries the same large
component (the average tile) and raw cosine distances between slides are all tiny and alike (0.0015-0.0026 on
the demo): the ranking follows whatever small differences survive, not tissue. Subtracting the view's mean slide
vector from the query and the candidates before cosine distance (``centring="mean"``) compares the slides'
deviations from the cohort instead. The mean is taken over every slide of the view's slide table (at the
version read), without labels, so it is the same for search and for evaluation; the query itself is part of it.

Evaluation (Yottixel, Kalra et al. 2020; SISH, Chen et al. 2022; RetCCL, Wang et al. 2023):
- a query's top k: its k nearest slides among the labelled slides of OTHER patients -- all slides of the query's
  patient (its tumour and normal slides, two slides of one tumour) are left out of its candidates, so that a
  patient's own slides are never easy hits; a query with fewer than k candidates is scored on those it has;
- MV@k: the share of queries whose top k's most frequent label is the query's label; a tie goes to the tied
  label met first, i.e. the nearest (as ``Counter.most_common`` does in SISH's evaluation);
- mMV@k: MV@k per class, averaged over the classes (macro), so a large class cannot hide a small one;
- AP@k = (1/k) * sum of precision@i over the ranks i <= k that hold a slide of the query's label (SISH's
  definition: 1 only when all k neighbours share the label); mAP@k is its mean over the queries.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from histcode.features.read import view_table
from histcode.features.registry import FeatureView
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

Centring = Literal["mean", "none"]
CENTRINGS: tuple[str, ...] = ("mean", "none")
TISSUE = "tissue"  # the derived label: normal | the tumour's subtype
EXPERIMENT = "retrieval"
CUTOFFS = (1, 3, 5)


# -- vectors -------------------------------------------------------------------------------------------------
def vector_matrix(data: pa.Table) -> np.ndarray:
    """The ``vector`` column of a table as an (N, dim) float64 array."""
    vectors = data.column("vector").combine_chunks()
    dim = vectors.type.list_size
    return vectors.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)


def replace_vectors(data: pa.Table, vectors: dict[str, np.ndarray] | None) -> np.ndarray:
    """The slide table's vectors, or (``vectors`` given) those of its slides in its row order."""
    if vectors is None:
        return vector_matrix(data)
    ids = data.column("slide_id").to_pylist()
    missing = [s for s in ids if s not in vectors]
    if missing:
        raise ValueError(f"{len(missing)} slides of the view have no pooled vector (first: {missing[0]})")
    return np.stack([np.asarray(vectors[s], dtype=np.float64) for s in ids])


def centre_of(vectors: np.ndarray, centring: Centring) -> np.ndarray | None:
    """What ``centring`` subtracts: the mean of ``vectors`` ("mean") or nothing ("none")."""
    if centring not in CENTRINGS:
        raise ValueError(f"centring must be one of {', '.join(CENTRINGS)}, not {centring!r}")
    return vectors.mean(axis=0) if centring == "mean" and len(vectors) else None


def cosine_distances(queries: np.ndarray, candidates: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """(q, n) cosine distances after subtracting ``centre`` from both sides; a vector of norm 0 (a slide equal to
    the centre) is at distance 1 from everything."""
    q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    c = np.atleast_2d(np.asarray(candidates, dtype=np.float64))
    if centre is not None:
        q, c = q - centre, c - centre

    def unit(m: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        return np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)

    return 1.0 - unit(q) @ unit(c).T


def ranked(distances: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest finite distances, nearest first (ties in index order)."""
    order = np.argsort(distances, kind="stable")
    return order[np.isfinite(distances[order])][:k]


# -- metrics -------------------------------------------------------------------------------------------------
def majority_label(labels: Sequence[str]) -> str | None:
    """The most frequent label; among tied labels the one that comes first (the nearest)."""
    return Counter(labels).most_common(1)[0][0] if len(labels) else None


def average_precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """AP@k = (1/k) * sum of precision@i over the relevant ranks i <= k (SISH)."""
    hits, total = 0, 0.0
    for i, rel in enumerate(list(relevant)[:k], start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / k


def cutoffs_for(k: int) -> tuple[int, ...]:
    """The cutoffs scored for ``k``: 1, 3 and 5 where they do not exceed k, and k itself."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return tuple(sorted({c for c in CUTOFFS if c <= k} | {k}))


def tissue_label(sample_type: str | None, subtype: str | None) -> str | None:
    """normal for a normal slide (any sample type that says normal, e.g. TCGA's "Solid Tissue Normal"), else the
    tumour's subtype; None when neither is known."""
    if sample_type and "normal" in str(sample_type).lower():
        return "normal"
    return str(subtype) if subtype else None


def slide_labels(frame: pd.DataFrame, by: str) -> pd.Series:
    """The label ``by`` of each row: a column of the slide table, or ``tissue`` (normal / subtype); missing and
    empty values are None (those slides take no part)."""
    if by == TISSUE:
        missing = [c for c in ("sample_type", "subtype") if c not in frame]
        if missing:
            raise ValueError(f"label 'tissue' needs the slide columns sample_type and subtype; the table lacks {missing}")
        return pd.Series([tissue_label(a, b) for a, b in zip(frame.sample_type, frame.subtype)], index=frame.index,
                         dtype=object)
    if by not in frame or by == "vector":
        columns = [c for c in frame.columns if c not in ("vector", "slide_id", "n_tiles")]
        raise ValueError(f"no slide column {by!r} to label by (columns: {', '.join(columns)}, or '{TISSUE}')")
    return pd.Series([None if _missing(v) else str(v) for v in frame[by]], index=frame.index, dtype=object)


def _missing(value) -> bool:
    """None, NaN or empty."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == ""


# -- the evaluation ------------------------------------------------------------------------------------------
@dataclass
class RetrievalReport:
    """Per query slide: its label, its ranked neighbours, hits at each cutoff and AP@k; figures from these."""

    label: str
    k: int
    centring: str
    queries: pd.DataFrame  # slide_id, patient_id, label, neighbours, neighbour_labels, candidates, mv_at_<c>, ap_at_<k>
    view_id: str | None = None
    encoder_uri: str | None = None
    run_id: str | None = None

    @property
    def cutoffs(self) -> tuple[int, ...]:
        return cutoffs_for(self.k)

    @property
    def classes(self) -> list[str]:
        return sorted(self.queries.label.unique())

    @property
    def short_queries(self) -> int:
        """Queries that had fewer than k candidates (scored on those they had)."""
        return int((self.queries.candidates < self.k).sum())

    def _per_class(self) -> pd.DataFrame:
        cols = [f"mv_at_{c}" for c in self.cutoffs] + [f"ap_at_{self.k}"]
        return self.queries.groupby("label")[cols].mean()

    def metrics(self) -> dict[str, float]:
        """mv_at_<c> and mmv_at_<c> per cutoff, map_at_<k> (over queries) and mmap_at_<k> (over classes), and per
        class ``<class>/mv_at_<c>``, ``<class>/map_at_<k>``, ``<class>/slides``; plus slides, patients, classes."""
        q, per = self.queries, self._per_class()
        out: dict[str, float] = {"slides": len(q), "patients": q.patient_id.nunique(), "classes": len(per)}
        for c in self.cutoffs:
            out[f"mv_at_{c}"] = float(q[f"mv_at_{c}"].mean())
            out[f"mmv_at_{c}"] = float(per[f"mv_at_{c}"].mean())
        out[f"map_at_{self.k}"] = float(q[f"ap_at_{self.k}"].mean())
        out[f"mmap_at_{self.k}"] = float(per[f"ap_at_{self.k}"].mean())
        sizes = q.label.value_counts()
        for cls, row in per.iterrows():
            name = metric_name(str(cls))
            out[f"{name}/slides"] = int(sizes[cls])
            for c in self.cutoffs:
                out[f"{name}/mv_at_{c}"] = float(row[f"mv_at_{c}"])
            out[f"{name}/map_at_{self.k}"] = float(row[f"ap_at_{self.k}"])
        return out

    def table(self) -> pa.Table:
        """One row per class, then ``all`` (means over the query slides: MV@c, mAP@k) and ``macro`` (means over
        the classes of the same slides: mMV@c, and the classes' mean AP@k)."""
        q, per = self.queries, self._per_class()
        names = {f"mv_at_{c}": f"MV@{c}" for c in self.cutoffs} | {f"ap_at_{self.k}": f"mAP@{self.k}"}

        def row(name: str, slides: int | None, patients: int | None, figures: pd.Series) -> dict:
            return {"class": name, "slides": slides, "patients": patients,
                    **{names[c]: float(v) for c, v in figures.items()}}

        rows = [row(str(cls), int((q.label == cls).sum()), int(q[q.label == cls].patient_id.nunique()), figures)
                for cls, figures in per.iterrows()]
        rows.append(row("all", len(q), int(q.patient_id.nunique()), q[list(per.columns)].mean()))
        rows.append(row("macro", len(q), int(q.patient_id.nunique()), per.mean()))
        schema = pa.schema([("class", pa.string()), ("slides", pa.int64()), ("patients", pa.int64()),
                            *[(n, pa.float64()) for n in names.values()]])
        return pa.Table.from_pylist(rows, schema=schema)

    def headline(self) -> str:
        m, k = self.metrics(), self.k
        mv = ", ".join(f"MV@{c} {m[f'mv_at_{c}']:.3f}" for c in self.cutoffs)
        return (f"{mv}, mMV@{k} {m[f'mmv_at_{k}']:.3f}, mAP@{k} {m[f'map_at_{k}']:.3f} "
                f"({m['slides']} slides of {m['patients']} patients, {m['classes']} classes)")


def metric_name(text: str) -> str:
    """A class name as MLflow accepts it in a metric key (letters, digits, _ - . space /; others become _)."""
    return re.sub(r"[^\w\-. ]", "_", text) or "_"


def evaluate(vectors: np.ndarray, labels: Sequence[str | None], patients: Sequence[str | None],
             slide_ids: Sequence[str], k: int = 5, centring: Centring = "mean", centre: np.ndarray | None = None,
             label: str = TISSUE) -> RetrievalReport:
    """Leave-one-patient-out retrieval over the rows with a label. ``centre``: what centring subtracts (default:
    the mean of ``vectors``, all rows, labelled or not); ignored for ``centring="none"``. A missing patient id
    counts as a patient of its own."""
    cutoffs = cutoffs_for(k)
    vectors = np.asarray(vectors, dtype=np.float64)
    if not (len(vectors) == len(labels) == len(patients) == len(slide_ids)):
        raise ValueError("vectors, labels, patients and slide ids differ in length")
    if centring == "none":
        centre = None
    elif centre is None:
        centre = centre_of(vectors, centring)
    keep = np.array([not _missing(lab) for lab in labels], dtype=bool)
    idx = np.flatnonzero(keep)
    lab = np.array([str(labels[i]) for i in idx], dtype=object)
    pat = np.array([patients[i] if patients[i] is not None else f"slide:{slide_ids[i]}" for i in idx], dtype=object)
    if len(set(pat)) < 2:
        raise ValueError(f"retrieval needs labelled slides of at least 2 patients; there are {len(set(pat))}")
    dist = cosine_distances(vectors[idx], vectors[idx], centre)
    dist[pat[:, None] == pat[None, :]] = np.inf  # never a slide of the query's own patient (nor the query)
    rows = []
    for i in range(len(idx)):
        top = ranked(dist[i], k)
        got = [str(x) for x in lab[top]]
        row = {"slide_id": slide_ids[idx[i]], "patient_id": pat[i], "label": lab[i],
               "neighbours": [slide_ids[idx[j]] for j in top], "neighbour_labels": got,
               "distances": [float(dist[i, j]) for j in top], "candidates": int(np.isfinite(dist[i]).sum())}
        for c in cutoffs:
            row[f"mv_at_{c}"] = float(majority_label(got[:c]) == lab[i])
        row[f"ap_at_{k}"] = average_precision_at_k([g == lab[i] for g in got], k)
        rows.append(row)
    report = RetrievalReport(label, k, centring, pd.DataFrame(rows))
    if report.short_queries:  # debug: the CLI says so on stderr, and stdout carries the figures
        log.debug("%d of %d query slides had fewer than %d candidates of other patients; they are scored on those",
                  report.short_queries, len(rows), k)
    return report


def evaluate_view(ws: Workspace, view: FeatureView, *, by: str = TISSUE, k: int = 5, centring: Centring = "mean",
                  cohorts: Sequence[str] = (), as_of: int | str | None = None, where: str | None = None,
                  vectors: dict[str, np.ndarray] | None = None) -> RetrievalReport:
    """Leave-one-patient-out retrieval over the view's slides of the training ``cohorts`` (all training cohorts
    when empty) that have the label ``by``, optionally only those matching ``where`` (a filter on the slide
    table's columns). Centring subtracts the mean of the whole slide table, as slide search does. ``vectors``:
    slide vectors to use instead of the table's (another pooling), by slide id; slides without one take no part,
    in the queries, the candidates or the centre."""
    data = view_table(ws, view, SLIDE_KIND, as_of).to_lance().to_table()
    if data.num_rows == 0:
        raise ValueError(f"view {view.view_id} has no slide vectors: run `histcode embed`")
    if vectors is not None:  # another pooling: only the slides it pooled take part (e.g. those tested out of fold)
        data = data.filter(pa.array([s in vectors for s in data.column("slide_id").to_pylist()]))
        if data.num_rows == 0:
            raise ValueError(f"none of the pooled slide vectors is a slide of view {view.view_id}")
    vectors = replace_vectors(data, vectors)
    centre = centre_of(vectors, centring)
    frame = data.drop_columns(["vector"]).to_pandas()
    labels = slide_labels(frame, by)
    training = {s["slide_id"] for s in Catalog.of(ws).training_slides(view.spec_id, tuple(cohorts))}
    use = frame.slide_id.isin(training)
    if where:
        matching = set(_filtered_ids(view_table(ws, view, SLIDE_KIND, as_of), where))
        use &= frame.slide_id.isin(matching)
    labels = [lab if ok else None for lab, ok in zip(labels, use)]
    report = evaluate(vectors, labels, frame.patient_id.tolist(), frame.slide_id.tolist(), k, centring,
                      centre, by)
    report.view_id, report.encoder_uri = view.view_id, view.encoder_uri
    log.debug("retrieval on view %s by %s (centring %s): %s", view.view_id, by, centring, report.headline())
    return report


def _filtered_ids(table, where: str) -> list[str]:
    try:
        return table.to_lance().to_table(columns=["slide_id"], filter=where).column("slide_id").to_pylist()
    except Exception as exc:  # lance reports filter errors as several exception types
        raise ValueError(f"bad filter {where!r}: {exc}") from exc


def log_retrieval(tracker: Tracker, view: FeatureView, report: RetrievalReport, extra: dict | None = None) -> str:
    """One MLflow run in experiment ``retrieval``: params (view_id, encoder, label, k, centring, ...), the
    figures as metrics and the per-query neighbours as ``retrieval/queries.csv``. Returns the run id."""
    tags = {"histcode.view_id": view.view_id, "histcode.encoder_uri": view.encoder_uri, "histcode.label": report.label}
    pooling = (extra or {}).get("pooling") or "mean"
    name = f"retrieval-{report.label}-k{report.k}-{pooling}-{report.centring}-{view.view_id}"
    with tracker.run(EXPERIMENT, name, tags=tags) as run_id:
        tracker.log_params(run_id, {"view_id": view.view_id, "encoder": view.encoder_uri, "method": str(view.method),
                                    "label": report.label, "k": report.k, "centring": report.centring,
                                    "exclude": "same patient",
                                    **{k: v for k, v in (extra or {}).items() if v is not None}})
        tracker.log_metrics(run_id, report.metrics())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "queries.csv"
            report.queries.to_csv(path, index=False)
            tracker.log_artifact(run_id, path, "retrieval")
    report.run_id = run_id
    return run_id
