"""Prefect flow: materialise a feature view (tile and slide vectors into LanceDB).

One worker (``workers=1``, the default: features.workers): one task tagged ``gpu`` embeds and writes every slide.
Several: the flow plans the view, cuts its slides into ``workers`` shards of about equal tile counts and submits
one ``embed-shard`` task (tagged ``gpu``) per shard on a Dask cluster (a LocalCluster of ``workers`` processes,
or the scheduler at ``dask_address``, one GPU per worker); each stages its vectors in a folder of its own under
the workspace's outputs and touches neither Lance nor the catalog; the flow then commits the staged slides and
alone writes the catalog's ledger. Either way the rows are the same (tests/test_deploy.py), and a rerun carries on
where a lost worker stopped: materialisation is resumable and idempotent per slide. A markdown artifact records
the view, its Lance versions and example queries.

Run it:  python -m flows.embed --encoder histcode-encoder@adco --tag trained-on [--workers 2]
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from histcode.features.embed import materialize, plan_view
from histcode.features.shards import StagedShard, commit_shards, embed_shard, shards
from histcode.reports import embed_summary
from histcode.services.stack import scheduler_workers
from histcode.store.files import write_json
from histcode.tracking import telemetry_off
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


@task(name="materialize-view", tags=["gpu"], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def embed_task(workspace: str | None, encoder: str | None, tag: str | None) -> dict:
    telemetry_off()
    ws = Workspace.resolve(workspace).ensure()
    return embed_summary(materialize(ws, ws.config(), encoder=encoder, tag=tag, progress=False))


@task(name="embed-shard", tags=["gpu"], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5,
      task_run_name="embed-shard-{index}")
def embed_shard_task(workspace: str, view, dataset, folder: str, index: int) -> StagedShard:
    telemetry_off()
    ws = Workspace.resolve(workspace)
    return embed_shard(ws, ws.config(), view, dataset, Path(folder))


def _fan_out(ws: Workspace, encoder: str | None, tag: str | None, workers: int | None, dask_address: str | None) -> dict:
    from prefect_dask import DaskTaskRunner

    cfg = ws.config()
    workers = workers or (max(1, scheduler_workers(dask_address)) if dask_address else cfg.features.workers)
    plan = plan_view(ws, cfg, encoder)
    stage = ws.outputs_dir / "staging" / plan.view.view_id
    shutil.rmtree(stage, ignore_errors=True)  # a crashed run's leftovers may predate a slide's new content
    start = time.perf_counter()
    staged: list[StagedShard] = []
    if plan.todo:
        parts = shards(plan.dataset(), workers)
        runner = (DaskTaskRunner(address=dask_address) if dask_address else
                  DaskTaskRunner(cluster_kwargs={"n_workers": len(parts), "threads_per_worker": 1, "processes": True}))

        @flow(name="histcode-embed-shards", task_runner=runner)
        def run_shards() -> list:
            futures = [embed_shard_task.submit(str(ws.root), plan.view, part, str(stage / f"shard-{i}"), i)
                       for i, part in enumerate(parts)]
            out = []
            for future in futures:
                try:
                    out.append(future.result())
                except Exception as exc:  # noqa: BLE001 -- its slides are failed by commit_shards, redone next run
                    get_run_logger().error("an embedding shard failed after its retry: %s", exc)
            return out

        staged = run_shards()
    return embed_summary(commit_shards(plan, staged, tag, seconds=time.perf_counter() - start))


@flow(name="histcode-embed")
def embed_flow(encoder: str | None = None, tag: str | None = None, workspace: str | None = None,
               workers: int | None = None, dask_address: str | None = None) -> dict:
    """Embed every tiled slide with ``encoder`` (default: features.encoder of params.yaml), in one task or
    sharded over ``workers`` Dask workers (default features.workers; ``dask_address``, default
    ``$HISTCODE_DASK_ADDRESS``: an existing scheduler, sharded over as many workers as it has)."""
    ws = Workspace.resolve(workspace).ensure()
    dask_address = dask_address or os.environ.get("HISTCODE_DASK_ADDRESS") or None
    if dask_address or (workers or ws.config().features.workers) > 1:
        summary = _fan_out(ws, encoder, tag, workers, dask_address)
    else:
        summary = embed_task(workspace, encoder, tag)
    summary = {**summary, "dask_address": dask_address}
    write_json(ws.metrics_dir / "embed.json", summary)
    lines = [
        f"## Feature view `{summary['view_id']}`",
        f"- encoder `{summary['encoder_uri']}` ({summary['dim']}-d), tiling spec `{summary['spec_id']}`",
        f"- {summary['slides_embedded']} slides embedded now ({summary['workers']} workers), "
        f"{summary['slides_skipped']} already done, {summary['failed']} failed; {summary['tiles_per_s']} tiles/s",
        f"- Lance versions: {summary['lance_versions']}",
        "- try: `histcode sql \"SELECT slide_id, count(*) FROM tile_embeddings GROUP BY 1\"`",
    ]
    create_markdown_artifact("\n".join(lines), key="histcode-embed")
    get_run_logger().info("view %s: %d slides embedded", summary["view_id"], summary["slides_embedded"])
    return summary


if __name__ == "__main__":
    run_flow_from_argv(embed_flow)
