"""The stores a workspace uses and the services a lab's environment points it at, checked without writing.

- the DuckDB catalog: opened read-only straight through DuckDB (``Catalog.connect`` would upgrade an older
  schema, which is a write); a file DuckDB cannot open or that is shorter than its blocks (truncated, not a
  database) or a schema newer than this HistCode is a failure, whose fix names the backup
  (``catalog.duckdb.bak``) when there is one; one held by a writer is a warning;
- the vector tables (LanceDB, local or on S3): every view the catalog calls materialised has its tile and slide
  tables, and a tile table holds the rows the ledger says it does;
- the MLflow tracking store: a server answers ``/health``; a local SQLite store is opened with a plain client
  (no relocation of a copied store: that is left to the next command that writes);
- the shared services named in the environment: the S3 endpoint, the Prefect API, the Dask scheduler;
- the label gate: the current label set and whether it passed.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from histcode.doctor.finding import FAIL, OK, WARN, Finding
from histcode.workspace import Workspace

AREA = "stores"
CONNECT_TIMEOUT_S = 3.0


def reachable(url: str, default_port: int | None = None, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host and port opens within ``timeout``, else why not."""
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    host = parsed.hostname
    port = parsed.port or default_port or {"http": 80, "https": 443}.get(parsed.scheme)
    if not host or not port:
        return f"{url!r} names no host and port"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def http_health(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when ``url`` answers with a 2xx status, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 -- the lab's own service URL
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {url}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def catalog_checks(ws: Workspace) -> tuple[list[Finding], list[dict], list[dict]]:
    """Findings, the feature views and the ledger totals per view (empty when the catalog cannot be read)."""
    import duckdb

    from histcode.store.schema import SCHEMA_VERSION

    path = ws.catalog_path
    item = f"catalog {path}"
    if not path.exists():
        return [Finding(AREA, item, WARN, "no catalog yet", "run `histcode ingest` (or `histcode demo`)")], [], []
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            return [Finding(AREA, item, WARN, f"in use by a writing process ({str(exc).splitlines()[0][:200]})",
                            "run doctor again when the running command has finished")], [], []
        return [_damaged(item, exc, path)], [], []
    except duckdb.Error as exc:
        return [_damaged(item, exc, path)], [], []
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "meta" not in tables:
            return [Finding(AREA, item, FAIL, "a DuckDB file without HistCode's schema (no meta table)",
                            "point HISTCODE_HOME at a HistCode workspace")], [], []
        version = int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0])
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]
                  for t in ("slides", "tilings", "materializations") if t in tables}
        views = ([dict(zip(("view_id", "kind", "model_name", "model_version", "status", "table_name"), r))
                  for r in con.execute("SELECT view_id, kind, model_name, model_version, status, lance_table "
                                       "FROM feature_views ORDER BY view_id, kind").fetchall()]
                 if "feature_views" in tables else [])
        ledger = ([dict(zip(("view_id", "slides", "rows"), r)) for r in con.execute(
            "SELECT view_id, count(*), sum(rows) FROM materializations WHERE status = 'ok' GROUP BY view_id").fetchall()]
            if "materializations" in tables else [])
    except duckdb.Error as exc:
        return [_damaged(item, exc, path)], [], []
    finally:
        con.close()
    from histcode.store.backup import whole

    if not whole(path):  # opens, but shorter than its blocks: a truncated copy fails only where it is read
        return [_damaged(item, "the file is shorter than the blocks it records (truncated)", path)], [], []
    findings = []
    if version > SCHEMA_VERSION:
        findings.append(Finding(AREA, item, FAIL, f"schema version {version} is newer than this HistCode's "
                                f"({SCHEMA_VERSION})", "upgrade HistCode (git pull; make setup)"))
    elif version < SCHEMA_VERSION:
        findings.append(Finding(AREA, item, WARN, f"schema version {version}, older than this HistCode's "
                                f"({SCHEMA_VERSION})", "the next writing command (e.g. `histcode ingest`) upgrades it"))
    else:
        findings.append(Finding(AREA, item, OK, f"schema {version}; " + ", ".join(f"{n} {t}" for t, n in counts.items())))
    return findings, views, ledger


def _damaged(item: str, exc: BaseException | str, path) -> Finding:
    """A catalog DuckDB cannot read; the fix names its backup (``histcode.store.backup``) when there is one."""
    from histcode.store.backup import restore_hint

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return Finding(AREA, item, FAIL, f"cannot be opened: {first}", restore_hint(path))


def vector_checks(ws: Workspace, views: list[dict], ledger: list[dict]) -> list[Finding]:
    from histcode.store.vectors import connect, table_names

    uri = ws.lancedb_uri
    item = f"vector tables {uri}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if "://" in uri and endpoint:
        why = reachable(endpoint)
        if why:
            return [Finding(AREA, item, FAIL, f"the S3 endpoint AWS_ENDPOINT_URL={endpoint} does not answer ({why})",
                            "start it (`histcode services up` for the local stack) or fix AWS_ENDPOINT_URL")]
    materialised = [v for v in views if v["status"] in ("ok", "partial")]
    if "://" not in uri and not ws.lancedb_dir.exists():
        if materialised:
            return [Finding(AREA, item, FAIL, f"the folder is missing, but the catalog calls "
                            f"{len({v['view_id'] for v in materialised})} view(s) materialised",
                            "restore data/lancedb (DVC) or run `histcode embed --recheck`")]
        return [Finding(AREA, item, OK, "no vector tables yet")]
    try:
        db = connect(uri)
        present = set(table_names(db))
    except Exception as exc:  # noqa: BLE001 -- Lance and object storage raise many types for one outage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return [Finding(AREA, item, FAIL, f"cannot be listed: {first}",
                        "check HISTCODE_LANCEDB_URI and the AWS_* variables")]
    rows_of = {r["view_id"]: (int(r["slides"]), int(r["rows"] or 0)) for r in ledger}
    findings = []
    for view in materialised:
        name = view["table_name"]
        what = f"view {view['view_id']} ({view['model_name']}/{view['model_version']}) {view['kind']} table"
        if name not in present:
            findings.append(Finding(AREA, what, FAIL, f"table {name} is missing, but the catalog calls the view "
                                    "materialised", "restore data/lancedb (DVC) or run `histcode embed --recheck`"))
            continue
        if view["kind"] != "tile":
            continue
        slides, rows = rows_of.get(view["view_id"], (0, 0))
        try:
            counted = db.open_table(name).count_rows()
        except Exception as exc:  # noqa: BLE001
            findings.append(Finding(AREA, what, FAIL, f"table {name} cannot be read: {exc}",
                                    "restore data/lancedb (DVC) or run `histcode embed --recheck`"))
            continue
        if counted < rows:
            findings.append(Finding(AREA, what, FAIL, f"{counted} rows, but the ledger records {rows} for {slides} "
                                    "slides", "run `histcode embed --recheck`"))
        else:
            findings.append(Finding(AREA, what, OK, f"{counted} rows ({slides} slides in the ledger)"))
    if not findings:
        findings.append(Finding(AREA, item, OK, f"{len(present)} tables, no materialised view"))
    return findings


def mlflow_check(ws: Workspace) -> tuple[Finding, object | None]:
    """The tracking store, and a client over it when it can be read (None otherwise)."""
    uri = ws.mlflow_uri
    if ws.mlflow_is_local:
        db = ws.mlruns_dir / "mlflow.db"
        if not db.is_file():
            return Finding(AREA, f"MLflow store {db}", WARN, "no tracking store yet (nothing trained or registered)",
                           "run `histcode pretrain` or `histcode encoders register`"), None
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        item = f"MLflow store {db}"
    else:
        why = http_health(uri.rstrip("/") + "/health")
        if why:
            return Finding(AREA, f"MLflow server {uri}", FAIL, f"does not answer ({why})",
                           "start it (`histcode services up` for the local stack) or fix HISTCODE_MLFLOW_URI"), None
        from histcode.tracking import Tracker

        client = Tracker(ws).client
        item = f"MLflow server {uri}"
    try:
        models = client.search_registered_models(max_results=1000)
    except Exception as exc:  # noqa: BLE001 -- MLflow raises many types for an unreadable store
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return Finding(AREA, item, FAIL, f"cannot be read: {first}",
                       "restore mlruns/ (DVC) or check the server's backend store"), None
    return Finding(AREA, item, OK, f"{len(models)} registered model(s)"), client


def service_checks() -> list[Finding]:
    """The shared services the environment names; an unset variable means the embedded default is used."""
    out = []
    prefect = os.environ.get("PREFECT_API_URL")
    if prefect:
        why = http_health(prefect.rstrip("/") + "/health")
        out.append(Finding(AREA, f"Prefect API {prefect}", FAIL if why else OK,
                           f"does not answer ({why})" if why else "answers",
                           "start it (`histcode serve` or `histcode services up`) or unset PREFECT_API_URL to run "
                           "flows with a temporary local API" if why else None))
    dask = os.environ.get("HISTCODE_DASK_ADDRESS")
    if dask:
        why = reachable(dask, 8786)
        out.append(Finding(AREA, f"Dask scheduler {dask}", FAIL if why else OK,
                           f"does not answer ({why})" if why else "answers",
                           "start it (`dask scheduler`, or `histcode services up`) or unset HISTCODE_DASK_ADDRESS"
                           if why else None))
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        why = reachable(endpoint)
        out.append(Finding(AREA, f"S3 endpoint {endpoint}", FAIL if why else OK,
                           f"does not answer ({why})" if why else "answers",
                           "start it or fix AWS_ENDPOINT_URL" if why else None))
    return out


def label_check(ws: Workspace) -> Finding:
    import duckdb

    item = "label gate"
    if not ws.catalog_path.exists():
        return Finding(AREA, item, OK, "no catalog, no labels yet")
    try:
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
        try:
            rows = con.execute("SELECT label_version, gate_status, gate_failures FROM label_sets WHERE is_current"
                               ).fetchall()
        finally:
            con.close()
    except duckdb.Error:
        return Finding(AREA, item, WARN, "the catalog could not be read (see above)")
    if not rows:
        return Finding(AREA, item, WARN, "no labels: heads cannot train",
                       "`histcode labels ingest` then `histcode labels gate`")
    version, status, failures = rows[0]
    if status == "passed":
        return Finding(AREA, item, OK, f"label set {version} passed the gate")
    if status == "pending":
        return Finding(AREA, item, WARN, f"label set {version} has not been through the gate", "`histcode labels gate`")
    reasons = [f.get("message", "") for f in json.loads(failures or "[]")]
    return Finding(AREA, item, FAIL, f"label set {version} failed the gate: " + "; ".join(reasons[:3]),
                   "fix the expression file and run `histcode labels ingest` again")
