"""Prefect flow: materialise a feature view (tile and slide vectors into LanceDB) as one task tagged ``gpu``.

Materialisation is resumable and idempotent per slide, so the task's retry simply carries on where a lost
worker stopped. A markdown artifact records the view, its Lance versions and example queries.

Run it:  python -m flows.embed --encoder histcode-encoder@adco --tag trained-on
"""

from __future__ import annotations


from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from histcode.features.embed import materialize
from histcode.reports import embed_summary
from histcode.store.files import write_json
from histcode.tracking import telemetry_off
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


@task(name="materialize-view", tags=["gpu"], cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def embed_task(workspace: str | None, encoder: str | None, tag: str | None) -> dict:
    telemetry_off()
    ws = Workspace.resolve(workspace).ensure()
    summary = embed_summary(materialize(ws, ws.config(), encoder=encoder, tag=tag, progress=False))
    write_json(ws.metrics_dir / "embed.json", summary)
    return summary


@flow(name="histcode-embed")
def embed_flow(encoder: str | None = None, tag: str | None = None, workspace: str | None = None) -> dict:
    """Embed every tiled slide with ``encoder`` (default: features.encoder of params.yaml)."""
    summary = embed_task(workspace, encoder, tag)
    lines = [
        f"## Feature view `{summary['view_id']}`",
        f"- encoder `{summary['encoder_uri']}` ({summary['dim']}-d), tiling spec `{summary['spec_id']}`",
        f"- {summary['slides_embedded']} slides embedded now, {summary['slides_skipped']} already done, "
        f"{summary['failed']} failed; {summary['tiles_per_s']} tiles/s",
        f"- Lance versions: {summary['lance_versions']}",
        "- try: `histcode sql \"SELECT slide_id, count(*) FROM tile_embeddings GROUP BY 1\"`",
    ]
    create_markdown_artifact("\n".join(lines), key="histcode-embed")
    get_run_logger().info("view %s: %d slides embedded", summary["view_id"], summary["slides_embedded"])
    return summary


if __name__ == "__main__":
    run_flow_from_argv(embed_flow)
