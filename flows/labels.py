"""Prefect flow: ingest expression labels, then the Great Expectations gate. The flow fails when the gate
fails, so nothing scheduled after it (the heads) runs on bad labels; the gate's failures and the Data Docs
path are left as a markdown artifact either way.

Run it:  python -m flows.labels [--expression FILE] [--sample-sheet CSV]
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from histcode.labels.run import gate_labels, ingest_labels, passed_label_set
from histcode.reports import gate_summary, labels_summary
from histcode.store.files import write_json
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


@task(name="labels-up-to-date", cache_policy=NO_CACHE)
def up_to_date_task(workspace: str | None, expression: str | None, sample_sheet: str | None) -> dict | None:
    """The previous reports, if the current label set is exactly what ingesting now would give and it passed."""
    ws = Workspace.resolve(workspace)
    current = passed_label_set(ws, ws.config(), Path(expression) if expression else None,
                               Path(sample_sheet) if sample_sheet else None)
    reports = [ws.metrics_dir / "labels.json", ws.metrics_dir / "label_gate.json"]
    if current is None or not all(p.is_file() for p in reports):
        return None
    labels, gate = (json.loads(p.read_text()) for p in reports)
    return {"labels": labels, "gate": gate} if labels["label_version"] == current["label_version"] else None


@flow(name="histcode-labels")
def labels_flow(expression: str | None = None, sample_sheet: str | None = None, force: bool = False,
                workspace: str | None = None) -> dict:
    """Ingest the expression matrix and gate the label set; a label set that is unchanged and passed is kept
    as it is unless ``force``."""
    done = None if force else up_to_date_task(workspace, expression, sample_sheet)
    if done is not None:
        get_run_logger().info("label set %s is up to date and passed the gate", done["labels"]["label_version"])
        return {**done, "reused": True}
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
    return {"labels": labels, "gate": gate, "reused": False}


if __name__ == "__main__":
    run_flow_from_argv(labels_flow)
