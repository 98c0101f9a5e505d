"""Rich tables and messages for the command line (presentation only; no work is done here)."""

from __future__ import annotations

from rich.table import Table

from histcode.ingest.run import IngestReport
from histcode.store.catalog import Catalog
from histcode.tiling.run import TilingReport

STATUS_STYLE = {"ok": "green", "failed": "red", "invalidated": "yellow"}


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def ingest_table(report: IngestReport) -> Table:
    table = Table(title=f"ingest: {len(report.outcomes)} slides, {len(report.failed)} failed")
    for col in ("slide_id", "action", "status", "vendor", "levels", "mpp", "reason"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        mpp = f"{o.mpp:.4g} ({o.mpp_source})" if o.mpp else ""
        table.add_row(o.slide_id, o.action, _status(o.status), o.vendor or "", str(o.levels or ""), mpp, o.reason or "")
    return table


def tiling_table(report: TilingReport) -> Table:
    ok = sum(o.status == "ok" for o in report.outcomes)
    table = Table(title=f"tile (spec {report.spec_id}): {report.n_tiles} tiles on {ok} slides, {len(report.failed)} failed")
    for col in ("slide_id", "action", "status", "tiles", "grid", "seconds", "reason"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        secs = f"{o.seconds:.2f}" if o.seconds is not None else ""
        table.add_row(o.slide_id, o.action, _status(o.status), str(o.n_tiles), str(o.n_candidates or ""), secs, o.reason or "")
    if report.not_ingested:
        table.caption = f"not tiled (ingest failed): {', '.join(report.not_ingested)}"
    return table


def embed_table(report) -> Table:
    v = report.view
    table = Table(title=f"embed view {v.view_id} ({v.encoder_uri}, {v.dim}-d, spec {v.spec_id}): "
                        f"{report.count('embedded')} embedded, {report.count('skipped')} already done, "
                        f"{len(report.failed)} failed; {report.tiles_per_s:.0f} tiles/s")
    for col in ("slide_id", "action", "rows", "reason"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        style = "red" if o.action == "failed" else "green" if o.action == "embedded" else "white"
        table.add_row(o.slide_id, f"[{style}]{o.action}[/]", str(o.rows or ""), o.reason or "")
    if report.maintenance:
        table.caption = "; ".join(report.maintenance)
    return table


ID_WIDTH, TEXT_WIDTH = 26, 48  # the widest an id / a text column gets unless --wide
SHRINKABLE = ("_id", "path", "reason", "vendor", "mpp", "size", "name", "uri", "hash", "json")
MIN_SHRUNK = 8


def _text(value) -> str:
    if isinstance(value, list):
        return f"<{len(value)}-d vector>"
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _fit(names: list[str], rows: list[dict], width: int) -> tuple[list[str], list[int]]:
    """Columns and widths that fit ``width`` characters: numbers and short labels keep their width, ids and
    texts shrink (to MIN_SHRUNK at least); columns that still do not fit are left out, from the right."""
    natural = [max([len(n)] + [len(_text(r[n])) for r in rows]) for n in names]
    shrinks = [n.endswith(SHRINKABLE) for n in names]
    widths = [min(w, ID_WIDTH if n.endswith(("_id", "path")) else TEXT_WIDTH) if s else w
              for n, w, s in zip(names, natural, shrinks)]
    names = list(names)
    total = lambda: sum(w + 3 for w in widths) + 1  # noqa: E731 -- a border and two spaces of padding per column
    while total() > width and len(names) > 1:
        candidates = [i for i, s in enumerate(shrinks) if s and widths[i] > max(MIN_SHRUNK, len(names[i]) // 2)]
        if candidates:
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1
        else:
            names.pop(), widths.pop(), shrinks.pop()
    return names, widths


def arrow_table(data, limit: int, wide: bool = False, title: str | None = None, columns: list[str] | None = None,
                width: int | None = None) -> Table:
    """A pyarrow table as a rich table (vectors shown by their dimension, floats to 4 digits, statuses in
    colour) that fits the terminal (``width``, default the console's): one line per row; numbers and short
    labels keep their width, ids, paths and texts are cut with an ellipsis, columns that do not fit are left
    out; ``columns`` (when given) are the ones shown. ``wide`` shows every column and every value whole (cells
    wrap); ``--format csv`` or ``json`` give the values as they are."""
    from rich.console import Console

    rows = data.slice(0, limit).to_pylist()
    names = data.column_names if wide or columns is None else [c for c in columns if c in data.column_names]
    widths = None
    if not wide:
        names, widths = _fit(names, rows, width or Console().width)
    hidden = data.num_columns - len(names)
    caption = f"{data.num_rows} rows" + (f", first {limit} shown" if data.num_rows > limit else "")
    if not wide and rows:
        caption += f"; --wide shows {f'{hidden} more columns and ' if hidden else ''}long values whole"
    table = Table(title=title, caption=caption)
    for i, name in enumerate(names):
        if wide:
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, overflow="ellipsis", no_wrap=True, width=widths[i])
    for row in rows:
        table.add_row(*(_status(str(row[n])) if n == "status" and row[n] else _text(row[n]) for n in names))
    return table


def heads_table(summary: dict) -> Table:
    table = Table(title=f"heads on view {summary['view_id']} ({summary['encoder_uri']}), labels {summary['label_version']}")
    for col in ("task/aggregator", "AUC [95% CI]", "bal. acc.", "F1", "gene AUC", "gene r", "mask AUC", "version", "best"):
        table.add_column(col)
    for key, r in summary["runs"].items():
        task, agg = key.split("/")
        nan = float("nan")
        ci = lambda k: f"{r[k]:.3f} [{r.get(k + '_ci_low', nan):.2f}, {r.get(k + '_ci_high', nan):.2f}]" if k in r else ""  # noqa: E731
        fmt = lambda k: f"{r[k]:.3f}" if k in r else ""  # noqa: E731
        if agg == "best":  # the selection procedure: which aggregator each outer fold chose
            mark = "folds: " + ", ".join(f"{a} {n}" for a, n in r.get("chosen", {}).items())
        else:
            mark = "*" if summary["best"].get(task) == agg else ""
        table.add_row(key, ci("auc"), fmt("balanced_accuracy"), fmt("f1"), ci("mean_gene_auc"), ci("mean_gene_pearson"),
                      fmt("attention_mask_auc"), str(r.get("version") or ""), mark)
    return table


def slides_frame(catalog: Catalog, status: str | None = None):
    """The catalog's slides, one row each: cohort, status, scale, tilings and tiles, failure reason."""
    import pyarrow as pa

    rows = catalog.query(
        """SELECT s.slide_id, s.patient_id, s.cohort, s.status, s.vendor, s.width, s.height, s.mpp_x, s.mpp_source,
                  count(t.slide_id) AS specs, coalesce(sum(t.n_tiles), 0) AS tiles, s.reason
           FROM slides s LEFT JOIN tilings t ON t.slide_id = s.slide_id AND t.status = 'ok'
           WHERE ? IS NULL OR s.status = ?
           GROUP BY ALL ORDER BY s.slide_id""",
        [status, status],
    )
    out = [{"slide_id": r["slide_id"], "patient_id": r["patient_id"], "cohort": r["cohort"], "status": r["status"],
            "vendor": r["vendor"], "size": f"{r['width']}x{r['height']}" if r["width"] else None,
            "mpp": f"{r['mpp_x']:.4g} ({r['mpp_source']})" if r["mpp_x"] else None, "specs": int(r["specs"]),
            "tiles": int(r["tiles"]), "reason": r["reason"]} for r in rows]
    names = ["slide_id", "patient_id", "cohort", "status", "vendor", "size", "mpp", "specs", "tiles", "reason"]
    return pa.Table.from_pylist(out) if out else pa.table({n: pa.array([], pa.string()) for n in names})


def pretrain_lines(summary: dict | None, reused: bool) -> str:
    if not summary:
        return "  encoder: not trained (fix the failures above first)"
    state = "up to date, reused" if reused else f"{summary['steps']} steps, final loss {summary['final_loss']:.3f}"
    text = f"  encoder: {summary['method']} ({state}); MLflow run {summary['run_id']}, registered version {summary['version']}"
    probe = summary.get("probe") or {}
    if probe:
        text += "\n" + probe_lines(probe, "  ")
    return text


def probe_lines(probe: dict, indent: str = "") -> str:
    """The linear probe's reporting half, per task, tiles as they are and re-stained: AUC of the trained encoder,
    random init and colour side by side, and the gain over random init with its paired 95% interval."""
    if "probe/report/tiles" not in probe:
        return ""
    lines = [f"{indent}linear probe, reporting half ({int(probe['probe/report/tiles'])} of {int(probe['probe_tiles'])} "
             "held-aside tiles): AUC trained : random init : colour, trained - random [95% CI]"]
    for task in ("tissue", "tumour", "subtype"):
        cells = []
        for suffix, what in (("", "as they are"), ("/restained", "re-stained")):
            key = f"probe/report/{task}{suffix}"
            if f"{key}/trained_auc" not in probe:
                continue
            auc = " : ".join(f"{probe[f'{key}/{n}_auc']:.3f}" for n in ("trained", "random_init", "colour"))
            gain = f"{key}/gain_vs_random_init"
            cells.append(f"{what} {auc}, {probe[gain]:+.3f} [{probe[gain + '_ci_low']:+.3f}, "
                         f"{probe[gain + '_ci_high']:+.3f}]")
        if cells:
            lines.append(f"{indent}  {task:<8} " + "; ".join(cells))
    return "\n".join(lines)


def first_slide(outcome) -> str:
    ids = sorted(o.slide_id for o in outcome.ingest.outcomes if o.status == "ok")
    return ids[0] if ids else "<slide_id>"


def embed_lines(summary: dict | None) -> str:
    if not summary:
        return "  features: not materialised"
    return (f"  features: view {summary['view_id']} ({summary['dim']}-d, {summary['encoder_uri']}): "
            f"{summary['slides_embedded']} slides embedded now, {summary['slides_skipped']} already done")


def label_lines(labels: dict | None, gate: dict | None) -> str:
    if not labels or not gate:
        return "  labels: not computed"
    state = "[green]passed[/]" if gate["passed"] else "[red]FAILED[/]: " + "; ".join(gate["failures"])
    kept = len([g for g in labels["excluded_genes"]])
    return (f"  labels: {labels['label_version']}, {labels['patients']} patients, DE classes {labels['de_classes']}, "
            f"{kept} genes excluded from classification; gate {state}\n"
            f"  Data Docs: {gate['data_docs']}")


def heads_lines(heads: dict | None, heatmap) -> str:
    if not heads:
        return "  heads: not trained"
    parts = []
    for key, r in heads["runs"].items():
        score = r.get("auc", r.get("mean_gene_auc"))
        parts.append(f"{key} {'AUC' if 'auc' in r else 'gene AUC'} {score:.2f}")
    reused = " (up to date, reused)" if heads.get("reused") else ""
    text = f"  heads (pooled CV){reused}: " + ", ".join(parts) + f"; best: {heads['best']}"
    strict = [f"{key} {r.get('strict_auc', r.get('strict_mean_gene_auc')):.2f}" for key, r in heads["runs"].items()
              if "strict_auc" in r or "strict_mean_gene_auc" in r]
    if strict:
        text += "\n  strict, on the patients the encoder never saw (pretrain.exclude_test_folds): " + ", ".join(strict)
    mask = heads["runs"].get("tumor/attention", {})
    if "attention_mask_auc" in mask:
        per = []
        for key, value in mask.items():
            if key.startswith("attention_mask_auc_tf_"):
                lo, hi = key.removeprefix("attention_mask_auc_tf_").split("_")
                per.append(f"{int(lo)}-{int(hi)}% {value:.2f} ({int(mask.get(f'n_mask_tf_{lo}_{hi}', 0))} slides)")
        text += (f"\n  attention vs tumour mask (out of fold, tumor/attention): {mask['attention_mask_auc']:.2f} "
                 f"(raw attention {mask.get('attention_mask_auc_raw', float('nan')):.2f}); by tumour fraction "
                 + ", ".join(per))
    if heatmap is not None:
        auc = f", attention vs tumour mask AUC {heatmap.mask_auc:.2f}" if heatmap.mask_auc is not None else ""
        text += f"\n  heatmap: {heatmap.pictures[0]}{auc}"
    return text


def retrieval_lines(retrieval: dict | None) -> str:
    if not retrieval or not retrieval.get("poolings"):
        return "  slide retrieval: not evaluated"
    said = {"out_of_fold": " (out-of-fold attention)"}
    parts = [f"{pooling} pooling{said.get(m.get('attention_source'), '')} mMV@5 {m['mmv_at_5']:.2f} (MV@1/3/5 "
             f"{m['mv_at_1']:.2f}/{m['mv_at_3']:.2f}/{m['mv_at_5']:.2f}, mAP@5 {m['map_at_5']:.2f})"
             for pooling, m in retrieval["poolings"].items()]
    return "  slide retrieval by tissue (leave one patient out): " + "; ".join(parts)


def next_steps(ws, outcome) -> str:
    """What to do after the demo: where things are and commands to try."""
    qc = ws.outputs_dir / "qc" / outcome.tiling.spec_id
    ingest, tiling = outcome.ingest, outcome.tiling
    sql = ("SELECT s.patient_id, count(*) AS tiles FROM tiles t JOIN slides s USING (slide_id) "
           "GROUP BY ALL ORDER BY tiles DESC LIMIT 5")
    return f"""
[bold]Demo pipeline done[/] (workspace {ws.root})
  slides: {len(ingest.outcomes)} ({ingest.count("registered")} new, {ingest.count("unchanged")} unchanged, {len(ingest.failed)} failed)
  tiles:  {tiling.n_tiles} under spec {tiling.spec_id} ({tiling.count("tiled")} slides tiled now, {tiling.count("skipped")} already done)
{pretrain_lines(outcome.pretrain, outcome.pretrain_reused)}
{embed_lines(outcome.embed)}
{label_lines(outcome.labels, outcome.gate)}
{heads_lines(outcome.heads, outcome.heatmap)}
{retrieval_lines(outcome.retrieval)}
  cohort: {outcome.cohort.out_dir}  (real LC25000 pixels; simulated layout, labels and expression: see its README.md)

[bold]Next[/]
  histcode mlflow-ui                                MLflow UI, http://127.0.0.1:5000: experiments 'pretrain', 'heads',
                                                    'heatmaps' (it prints links that open on their training runs)
  histcode serve                                    Prefect UI at http://127.0.0.1:4200 with the deployments; then
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run 'histcode-pipeline/demo'
  histcode pretrain --method moco                   another method, probed against the same random init
  histcode sql "SELECT subtype, count(*) AS tiles FROM tile_embeddings GROUP BY 1"
  histcode sql "SELECT slide_id, max(score) FROM tile_scores WHERE score_name = 'attention' GROUP BY 1"
  histcode search --slide {first_slide(outcome)} --k 5          the most similar slides
  histcode search --tile <tile_id> --where "subtype = 'LUSC'"  nearest tiles within LUSC slides
  histcode predict data/demo/slides/<a slide>.svs --out preds.csv --tile-scores tiles.csv
  histcode heatmap <slide_id> --gene KRT5           attention and a gene's tile scores over the slide
  histcode ablation                                 encoder x aggregator grid, compared in MLflow ('heads')
  histcode slides                                   the catalog, slide by slide
  ls {qc}      QC pictures: tissue mask and tile grid per slide
  ls {ws.outputs_dir / "heatmaps"}      attention and gene heatmaps
  python -c "import duckdb; print(duckdb.connect('{ws.catalog_path}', read_only=True).sql('{sql}'))"
  dvc repro                                         the same stages through DVC (source .venv/bin/activate first)
"""
