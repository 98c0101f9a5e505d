"""Prefect flow: the slide-level heads, only after the label gate passed, then heatmaps for a few slides.

The first task asks the catalog whether the current label set passed its Great Expectations gate and fails the
flow (naming what failed) when it did not, so no head ever trains on labels that were not validated. Heads whose
view state, label set and configuration are unchanged are not retrained: the flow reports the existing runs.
A markdown artifact lists every head's cross-validated metrics with a link to its MLflow run.

Run it:  python -m flows.heads [--task-names tumor de] [--aggregators attention mean] [--heatmaps 2] [--force]
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from histcode.reports import write_heads_report
from histcode.store.catalog import Catalog
from histcode.tracking import telemetry_off
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


@task(name="require-label-gate", cache_policy=NO_CACHE)
def gate_check_task(workspace: str | None) -> str:
    from histcode.labels.run import require_passed_gate

    ws = Workspace.resolve(workspace)
    return require_passed_gate(Catalog.of(ws))["label_version"]  # raises LabelGateError otherwise


@task(name="train-heads", tags=["gpu"], cache_policy=NO_CACHE)
def heads_task(workspace: str | None, tasks: list[str] | None, aggregators: list[str] | None, force: bool) -> dict:
    from histcode.apps.train_heads import completed_heads, train_heads

    telemetry_off()
    ws = Workspace.resolve(workspace).ensure()
    cfg = ws.config()
    if tasks or aggregators:
        cfg = cfg.model_copy(update={"heads": cfg.heads.model_copy(update={
            **({"tasks": tuple(tasks)} if tasks else {}), **({"aggregators": tuple(aggregators)} if aggregators else {})})})
    metrics = ws.metrics_dir / "heads.json"
    done = None if force else completed_heads(ws, cfg, metrics)
    if done is not None:
        get_run_logger().info("heads are up to date (%s): nothing to train", metrics)
        return {**done, "reused": True}
    return {**write_heads_report(train_heads(ws, cfg, force=force), metrics, ws.metrics_dir / "plots"), "reused": False}


@task(name="heatmap", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def heatmap_task(workspace: str | None, slide_id: str) -> dict:
    from histcode.apps.heatmaps import render_heatmaps

    telemetry_off()
    ws = Workspace.resolve(workspace)
    result = render_heatmaps(ws, slide_id, ws.outputs_dir / "heatmaps")
    return {"slide_id": slide_id, "pictures": [str(p) for p in result.pictures], "mask_auc": result.mask_auc}


@flow(name="histcode-heads")
def heads_flow(task_names: list[str] | None = None, aggregators: list[str] | None = None, heatmaps: int = 1,
               force: bool = False, workspace: str | None = None) -> dict:
    """Cross-validate and register the heads on the latest feature view (default tasks and aggregators from
    params.yaml), then draw heatmaps for the first ``heatmaps`` tumour slides."""
    label_version = gate_check_task(workspace)
    summary = heads_task(workspace, task_names, aggregators, force)
    ws = Workspace.resolve(workspace)
    tumour = [r["slide_id"] for r in Catalog.of(ws).query(
        "SELECT slide_id FROM slide_labels WHERE tumor ORDER BY slide_id")][:heatmaps]
    maps = [heatmap_task.submit(workspace, sid) for sid in tumour]
    maps = [m.result() for m in maps]
    lines = [f"## Heads on view `{summary['view_id']}`, label set `{label_version}`"
             + (" (up to date, not retrained)" if summary["reused"] else ""),
             f"- Lance tag `{summary['lance_tag']}`; best aggregator per task: {summary['best']}",
             "| head | metric | value | MLflow run |", "|---|---|---|---|"]
    for key, run in summary["runs"].items():
        metric = "auc" if "auc" in run else "mean_gene_auc"
        lines.append(f"| {key} | {metric} | {run.get(metric)} | `{run['run_id']}` |")
    lines += [f"- heatmap {m['slide_id']}: {', '.join(m['pictures'])}"
              + (f" (attention vs mask AUC {m['mask_auc']:.3f})" if m["mask_auc"] is not None else "") for m in maps]
    lines.append(f"- compare: `histcode --workspace {ws.root} mlflow-ui` (experiment `heads`)")
    create_markdown_artifact("\n".join(lines), key="histcode-heads")
    get_run_logger().info("heads on view %s: best %s", summary["view_id"], summary["best"])
    return {**summary, "heatmaps": maps}


if __name__ == "__main__":
    run_flow_from_argv(heads_flow)
