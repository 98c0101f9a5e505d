"""Prefect flow: ingest expression labels, then the Great Expectations gate. The flow fails when the gate
fails, so nothing scheduled after it (the heads) runs on bad labels; the gate's failures and the Data Docs
path are left as a markdown artifact either way.

Run it:  python -m flows.labels [--expression FILE] [--sample-sheet CSV]
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from histcode.labels.run import gate_labels, ingest_labels
from histcode.reports import gate_summary, labels_summary, write_json
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


class LabelGateFailed(RuntimeError):
    """The label gate failed; the message lists the failed expectations."""


@task(name="ingest-labels", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def ingest_task(workspace: str | None, expression: str | None, sample_sheet: str | None) -> dict:
    ws = Workspace.resolve(workspace).ensure()
    result = ingest_labels(ws, ws.config(), Path(expression) if expression else None,
                           Path(sample_sheet) if sample_sheet else None)
    summary = labels_summary(result)
    write_json(ws.metrics_dir / "labels.json", summary)
    return summary


@task(name="label-gate", cache_policy=NO_CACHE)
def gate_task(workspace: str | None) -> dict:
    ws = Workspace.resolve(workspace)
    summary = gate_summary(gate_labels(ws, ws.config()))
    write_json(ws.metrics_dir / "label_gate.json", summary)
    return summary


@flow(name="histcode-labels")
def labels_flow(expression: str | None = None, sample_sheet: str | None = None, workspace: str | None = None) -> dict:
    labels = ingest_task(workspace, expression, sample_sheet)
    gate = gate_task(workspace)
    lines = [f"## Label set `{labels['label_version']}`: gate {'passed' if gate['passed'] else 'FAILED'}",
             f"- {labels['samples']} samples, {labels['genes']} genes, {labels['patients']} patients; "
             f"DE classes {labels['de_classes']}",
             *(f"- failed: {m}" for m in gate["failures"]),
             *(f"- excluded gene {g}: {r}" for g, r in gate["excluded_genes"].items()),
             f"- Data Docs: {gate['data_docs']}"]
    create_markdown_artifact("\n".join(lines), key="histcode-labels")
    if not gate["passed"]:
        raise LabelGateFailed("label gate failed:\n" + "\n".join(gate["failures"]))
    get_run_logger().info("label set %s passed the gate", labels["label_version"])
    return {"labels": labels, "gate": gate}


if __name__ == "__main__":
    run_flow_from_argv(labels_flow)
