"""Prefect flow: the whole pipeline as one parent flow with the stages as sub-flows.

demo cohort (when no manifest is given) -> ingest + tile (one task per slide) -> labels + gate -> pretrain ->
embed -> heads + heatmaps. Every stage decides for itself what is already done from content, not from
Prefect's result cache: slides by file hash and tiling spec, the encoder by its configuration and the tile set,
the feature view per slide, the label set by the expression file's hash, labels config and slides, the heads by
view state, label set and heads config. So an unchanged rerun does almost nothing, a new slide is ingested,
tiled and embedded alone, and a result survives the loss of Prefect's own database. Tasks that need the
accelerator carry the tag ``gpu`` (`histcode serve` limits it to one at a time); catalog writes happen in the
flows themselves (one writer).

Run it:  python -m flows.pipeline [--manifest CSV] [--expression TSV] [--method moco] [--task-runner dask]
Deployed: prefect deployment run 'histcode-pipeline/demo'   (see prefect.yaml and `histcode serve`)
"""

from __future__ import annotations

import os
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows._entry import run_flow_from_argv
from flows.embed import embed_flow
from flows.heads import heads_flow
from flows.ingest import ingest_flow
from flows.labels import labels_flow
from flows.pretrain import pretrain_flow
from histcode.workspace import Workspace


@task(name="demo-cohort", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def demo_cohort_task(workspace: str | None) -> str:
    """Build (or find, unchanged) the demo cohort; returns its manifest."""
    from histcode.demo.build import build_demo_cohort

    ws = Workspace.resolve(workspace).ensure()
    cfg = ws.config()
    source = ws.path(cfg.demo.source_dir) if cfg.demo.source_dir else None
    return str(build_demo_cohort(cfg.demo, ws.path(cfg.demo.out_dir), source, progress=False).manifest)


def _ingest_runner(task_runner: str, dask_workers: int, dask_address: str | None):
    """The per-slide fan-out: Prefect's thread pool, or Dask: the scheduler at ``dask_address`` (a real cluster),
    else a LocalCluster of ``dask_workers`` processes (the same tasks, no other code path)."""
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True})
    return None


@flow(name="histcode-pipeline")
def pipeline_flow(
    manifest: str | None = None,
    cohort: str | None = None,
    expression: str | None = None,
    method: str | None = None,
    encoder: str | None = None,
    heatmaps: int = 1,
    task_runner: Literal["threads", "dask"] | None = None,
    dask_workers: int = 2,
    workspace: str | None = None,
    dask_address: str | None = None,
) -> dict:
    """Ingest and tile the slides of ``manifest`` (default: the demo cohort, built first) into ``cohort``
    (default: ingest.cohort, or demo.cohort for the demo), pretrain (``method``
    overrides pretrain.method; ``encoder``, a registered encoder such as ``histcode-encoder@adco``, skips
    pretraining and embeds with it), embed, label and gate ``expression`` (default labels.expression), train the
    heads and draw ``heatmaps`` heatmaps. Every stage skips what is already done. ``dask_address`` (default
    ``$HISTCODE_DASK_ADDRESS``): a Dask scheduler that the tiling (``task_runner`` then defaults to dask) and
    the materialisation fan out over."""
    log = get_run_logger()
    ws = Workspace.resolve(workspace).ensure()
    where = str(ws.root)
    if manifest is None:
        manifest, cohort = demo_cohort_task(where), cohort or ws.config().demo.cohort
    dask_address = dask_address or os.environ.get("HISTCODE_DASK_ADDRESS") or None
    runner = _ingest_runner(task_runner or ("dask" if dask_address else "threads"), dask_workers, dask_address)
    ingest = (ingest_flow.with_options(task_runner=runner) if runner else ingest_flow)(manifest=manifest, cohort=cohort, workspace=where)
    if ingest["tiling"]["tiles"] == 0:
        raise RuntimeError("no tiles: every slide failed or had no tissue; see `histcode slides`")
    # labels first: they need only the tiled slides (a failed gate stops the run before any training), and
    # pretrain.exclude_test_folds needs their folds
    labels = labels_flow(expression=expression, workspace=where)
    if encoder is None:
        trained = pretrain_flow(method=method, workspace=where)
        encoder = f"{trained['registered_model']}/{trained['version']}"
        encoder_line = (f"- encoder: {trained['method']} `{encoder}`" + (" (reused)" if trained.get("reused") else "")
                        + f", MLflow run `{trained['run_id']}` (experiment `pretrain`)")
    else:
        trained, encoder_line = None, f"- encoder: `{encoder}` (given; not pretrained)"
    view = embed_flow(encoder=encoder, workspace=where, dask_address=dask_address)
    heads = heads_flow(heatmaps=heatmaps, workspace=where)
    mlflow_ui = f"histcode --workspace {where} mlflow-ui"
    lines = [
        f"## HistCode pipeline on `{where}`",
        f"- slides: {ingest['ingest']['slides']} ({ingest['ingest']['failed']} failed), tiles: {ingest['tiling']['tiles']}",
        encoder_line,
        f"- feature view `{view['view_id']}`: {view['slides_embedded']} slides embedded now, {view['slides_skipped']} already done",
        f"- label set `{labels['labels']['label_version']}`: gate passed" + (" (reused)" if labels.get("reused") else ""),
        *(f"- head {k}: {'AUC' if 'auc' in r else 'mean gene AUC'} {r.get('auc', r.get('mean_gene_auc'))}, "
          f"MLflow run `{r['run_id']}` (experiment `heads`)" for k, r in heads["runs"].items()),
        *(f"- heatmap {m['slide_id']}: {m['pictures'][0]}" for m in heads["heatmaps"] if m["pictures"]),
        f"- compare the runs: `{mlflow_ui}`, then http://127.0.0.1:5000",
    ]
    create_markdown_artifact("\n".join(lines), key="histcode-pipeline")
    log.info("pipeline done on %s: view %s, heads %s", where, view["view_id"], heads["best"])
    return {"ingest": ingest, "pretrain": trained, "embed": view, "labels": labels, "heads": heads}


if __name__ == "__main__":
    run_flow_from_argv(pipeline_flow)
