"""Pretraining as every door runs it (`histcode pretrain`, the demo, the Prefect flow, DVC's ``pretrain`` stage):
a configuration that already finished on exactly the current tiles is reused, not trained and registered
again, and the stage's report (metrics/pretrain.json) is written either way, with the same content.

"Exactly" is ``histcode.ssl.pretrain.completed``: the pretrain section less its runtime knobs, the tiling spec
and the sorted tile ids of the training data name a run folder whose done.json points at a FINISHED MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.reports import pretrain_summary
from histcode.store.files import write_json
from histcode.workspace import Workspace

log = logging.getLogger(__name__)


def reused_summary(done: dict, cfg: HistcodeConfig) -> dict:
    """metrics/pretrain.json of a finished run, from its done.json (the keys `pretrain_summary` writes)."""
    return {
        "run_id": done["run_id"], "method": done["method"], "encoder": cfg.pretrain.encoder, "steps": done["steps"],
        "resumed_from_step": None, "final_loss": done.get("final_loss"), "img_per_s": done.get("img_per_s"),
        "registered_model": cfg.pretrain.register_as, "version": done["version"], "model_uri": done["model_uri"],
        "probe": done.get("probe") or {},
    }


def pretrain_or_reuse(ws: Workspace, cfg: HistcodeConfig, *, resume: bool = False, force: bool = False,
                      progress: bool = True, report: Path | None = None) -> tuple[dict, bool]:
    """(summary, reused). ``force`` trains even when an identical run finished; ``resume`` continues an
    interrupted run (and never reuses). Under torchrun only rank 0 gets a summary (the others get ``({}, False)``)."""
    from histcode.ssl.pretrain import completed, pretrain

    done = None if (force or resume) else completed(ws, cfg)
    if done is not None:
        log.info("pretraining is up to date: MLflow run %s, %s version %s", done["run_id"],
                 cfg.pretrain.register_as, done["version"])
        summary, reused = reused_summary(done, cfg), True
    else:
        result = pretrain(ws, cfg, resume=resume, progress=progress)
        if result.run_id is None:  # a torchrun process other than rank 0
            return {}, False
        summary, reused = pretrain_summary(result, cfg.pretrain), False
    write_json(report or ws.metrics_dir / "pretrain.json", summary)
    return summary, reused
