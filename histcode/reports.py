"""Stage reports: small JSON summaries that DVC tracks as metrics and that the CLI and flows print."""

from __future__ import annotations

import os
from pathlib import Path

from histcode.ingest.run import IngestReport
from histcode.store.files import write_json
from histcode.tiling.run import TilingReport


def ingest_summary(report: IngestReport) -> dict:
    return {
        "slides": len(report.outcomes),
        "registered": report.count("registered"),
        "changed": report.count("changed"),
        "updated": report.count("updated"),
        "unchanged": report.count("unchanged"),
        "failed": len(report.failed),
        "failures": {o.slide_id: o.reason for o in report.failed},
    }


def tiling_summary(report: TilingReport) -> dict:
    ok = [o for o in report.outcomes if o.status == "ok"]
    return {
        "spec_id": report.spec_id,
        "slides": len(report.outcomes),
        "slides_tiled_ok": len(ok),
        "tiled_now": report.count("tiled"),
        "skipped": report.count("skipped"),
        "failed": len(report.failed),
        "tiles": report.n_tiles,
        "tiles_per_slide_mean": round(report.n_tiles / len(ok), 2) if ok else 0.0,
        "not_ingested": report.not_ingested,
        "failures": {o.slide_id: o.reason for o in report.failed},
    }


def pretrain_summary(result, cfg) -> dict:
    """``result``: histcode.ssl.pretrain.PretrainResult; ``cfg``: the PretrainConfig it ran with."""
    return {
        "run_id": result.run_id,
        "method": result.method,
        "encoder": cfg.encoder,
        "steps": result.steps,
        "resumed_from_step": result.start_step if result.resumed else None,
        "final_loss": result.final_loss,
        "img_per_s": result.img_per_s,
        "registered_model": cfg.register_as,
        "version": result.version,
        "model_uri": result.model_uri,
        "probe": result.probe,
    }


def embed_summary(report) -> dict:
    """``report``: histcode.features.embed.EmbedReport."""
    v = report.view
    return {
        "view_id": v.view_id,
        "encoder_uri": v.encoder_uri,
        "dim": v.dim,
        "spec_id": v.spec_id,
        "slides_embedded": report.count("embedded"),
        "slides_skipped": report.count("skipped"),
        "failed": len(report.failed),
        "tiles_embedded": report.tiles_embedded,
        "tiles_per_s": round(report.tiles_per_s, 2),
        "workers": report.workers,
        "lance_versions": report.versions,
        "failures": {o.slide_id: o.reason for o in report.failed},
    }


def labels_summary(result) -> dict:
    """``result``: histcode.labels.run.LabelSet."""
    return {
        "label_version": result.label_version, "samples": result.n_samples, "genes": result.n_genes,
        "patients": result.n_patients, "de_classes": result.de_counts, "references": result.references,
        "excluded_genes": result.excluded_genes, "sample_problems": result.problems,
        "dropped_samples": result.dropped, "unlabelled_tumour_slides": result.unlabelled,
        "folds_by": result.folds_by, "folds_by_reason": result.folds_reason,
        "control_genes": list(result.control_genes), "control_genes_source": result.control_genes_source,
    }


def gate_summary(result) -> dict:
    """``result``: histcode.labels.gate.GateResult."""
    return {
        "passed": result.passed, "failures": [f.message for f in result.failures],
        "excluded_genes": result.excluded_genes, "data_docs": str(result.docs) if result.docs else None,
    }


def write_heads_report(report, metrics_path: Path, plots_dir: Path) -> dict:
    """``report``: histcode.apps.train_heads.HeadsReport. Writes its summary as metrics JSON and its ROC and per-gene
    tables as CSVs under ``plots_dir/roc`` and ``plots_dir/genes`` for `dvc plots show` (tables of heads not in
    this report are removed); returns the summary."""
    summary = report.summary()
    tables = report.plot_tables()
    for sub in ("roc", "genes"):
        (plots_dir / sub).mkdir(parents=True, exist_ok=True)
        for stale in set((plots_dir / sub).glob("*.csv")) - {plots_dir / f"{n}.csv" for n in tables}:
            stale.unlink()
    for name, table in tables.items():
        tmp = plots_dir / f"{name}.csv.tmp"
        table.to_csv(tmp, index=False)
        os.replace(tmp, plots_dir / f"{name}.csv")
    write_json(metrics_path, summary)
    return summary
