"""Prefect flow: contrastive pretraining as one task tagged ``gpu``.

A tag-based concurrency limit keeps GPU jobs from piling onto one device:
    prefect concurrency-limit create gpu 1
If the task fails (a lost worker, a killed process) Prefect retries it once, and the retry resumes from the
run's last checkpoint, continuing the same MLflow run. A markdown artifact links the MLflow run.

Run it:  python -m flows.pretrain --method moco --steps 100
"""

from __future__ import annotations


from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from histcode.apps.pretraining import pretrain_or_reuse
from histcode.tracking import telemetry_off
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


@task(name="pretrain-encoder", tags=["gpu"], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def pretrain_task(workspace: str | None, overrides: dict, resume: bool, force: bool = False) -> dict:
    telemetry_off()
    ws = Workspace.resolve(workspace).ensure()
    cfg = ws.config()
    if overrides:
        cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_validate({**cfg.pretrain.model_dump(), **overrides})})
    retrying = (task_run.run_count or 1) > 1  # a retry resumes from the checkpoint of the failed try
    summary, reused = pretrain_or_reuse(ws, cfg, resume=resume or retrying, force=force, progress=False)
    if reused:
        get_run_logger().info("pretraining is up to date: MLflow run %s", summary["run_id"])
    return {**summary, "reused": reused}


@flow(name="histcode-pretrain")
def pretrain_flow(
    method: str | None = None,
    encoder: str | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    workspace: str | None = None,
) -> dict:
    """Pretrain an encoder with the workspace's params.yaml; ``method``, ``encoder`` and ``steps`` override it.
    A configuration that already finished on exactly the current tiles is reused unless ``force``."""
    overrides = {k: v for k, v in {"method": method, "encoder": encoder, "max_steps": steps}.items() if v is not None}
    summary = pretrain_task(workspace, overrides, resume, force)
    ws = Workspace.resolve(workspace)
    probe = summary.get("probe", {})
    lines = [
        f"## Pretraining: {summary['method']} ({summary['steps']} steps, final loss {summary['final_loss']:.4f})"
        + (" (up to date, reused)" if summary["reused"] else ""),
        f"- MLflow run `{summary['run_id']}` in experiment `pretrain`; open the UI with "
        f"`histcode --workspace {ws.root} mlflow-ui` and follow its link to the `pretrain` runs",
        f"- registered `{summary['registered_model']}` version {summary['version']} (`{summary['model_uri']}`)",
    ]
    if probe:
        lines += ["- linear probe (reporting half, AUC trained : random init : colour):"] + [
            f"  - {task}: " + " : ".join(f"{probe[f'probe/report/{task}/{n}_auc']:.3f}"
                                         for n in ("trained", "random_init", "colour"))
            for task in ("tissue", "tumour", "subtype") if f"probe/report/{task}/trained_auc" in probe]
    create_markdown_artifact("\n".join(lines), key="histcode-pretrain")
    get_run_logger().info("pretrain %s finished: run %s", summary["method"], summary["run_id"])
    return summary


if __name__ == "__main__":
    run_flow_from_argv(pretrain_flow)
