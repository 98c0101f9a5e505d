"""The workspace: one directory from which every stored path derives.

Resolution order: an explicit path (``--workspace``), then ``HISTCODE_HOME``, then the repository this package
was installed from (the directory holding ``pyproject.toml`` next to the ``histcode`` package), then the current
directory. Several cohorts are kept apart by giving each its own workspace.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from histcode.config import HistcodeConfig, load_config

ENV_VAR = "HISTCODE_HOME"
PROJECT_ENV = "HISTCODE_PROJECT"
PROJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # MLflow's workspace names (DNS labels)
PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


def repository_root() -> Path | None:
    """The source checkout this package runs from, or None for a non-editable install."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else None


UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM = 96
RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.IGNORECASE)  # Windows device names


def file_stem(identifier: str) -> str:
    """A file-name stem for a slide id (or any id) that stays inside the folder it is joined to on every
    filesystem: ASCII letters, digits, '.', '_' and '-', no leading dot (so never '.' or '..'), no trailing dot,
    no Windows device name (CON, NUL, ...), at most 96 characters. An id that needed any change gets a hash of the
    whole id appended, so two different ids never share a stem ('a/b' -> 'a_b-1f0e...', 'a_b' -> 'a_b'). Ids
    that differ only in letter case keep their case (they would share a file on a case-insensitive disk)."""
    stem = UNSAFE_FILE_CHARS.sub("_", identifier).lstrip(".")
    if stem == identifier and 0 < len(stem) <= MAX_STEM and not RESERVED.match(stem) and not stem.endswith("."):
        return stem
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem[:MAX_STEM - 13]}-{digest}" if stem else f"id-{digest}"


def bundled_source_dir() -> Path:
    """The LC25000 lung tiles bundled with the source checkout (the demo cohort's pixels, the probe's tiles)."""
    root = repository_root()
    if root is None:
        raise FileNotFoundError("no bundled LC25000 tiles: set demo.source_dir (and pretrain.probe.source_dir) in params.yaml")
    return root / "data" / "lc25000_lung"


def resolve_root(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return repository_root() or Path.cwd().resolve()


@dataclass(frozen=True)
class Workspace:
    """Paths of every store, all under ``root``."""

    root: Path

    @classmethod
    def resolve(cls, explicit: str | Path | None = None) -> Workspace:
        return cls(resolve_root(explicit))

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    def config(self) -> HistcodeConfig:
        """params.yaml of this workspace, or the built-in defaults when it has none."""
        return load_config(self.params_path)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.duckdb"

    @property
    def lancedb_dir(self) -> Path:
        return self.data_dir / "lancedb"

    @property
    def project_file(self) -> Path:
        return self.root / ".histcode" / "project"

    def project(self) -> str:
        """This workspace's name on shared servers: its MLflow workspace (runs, models and aliases of its own) and
        the folder of its tables under ``$HISTCODE_LANCEDB_URI``. ``$HISTCODE_PROJECT`` when set, else the name
        kept in ``.histcode/project``, made once from the folder's name and a random suffix (so that two users'
        ``demo`` folders never share one, and a moved or copied workspace keeps its own)."""
        named = os.environ.get(PROJECT_ENV)
        if named:
            if not PROJECT_NAME.match(named):
                raise ValueError(f"{PROJECT_ENV}={named!r} is not a project name: lowercase letters, digits and inner "
                                 "'-', 2 to 63 characters")
            return named
        try:
            kept = self.project_file.read_text().strip()
            if PROJECT_NAME.match(kept):
                return kept
        except OSError:
            pass
        import secrets

        stem = re.sub(r"[^a-z0-9]+", "-", self.root.name.lower()).strip("-")[:48] or "histcode"
        name = f"{stem}-{secrets.token_hex(3)}"
        self.project_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.project_file.with_name(f"project.{os.getpid()}.tmp")
        tmp.write_text(name + "\n")
        try:
            os.link(tmp, self.project_file)  # first writer wins: two processes never pick two names
        except FileExistsError:
            name = self.project_file.read_text().strip()
        finally:
            tmp.unlink(missing_ok=True)
        return name

    @property
    def lancedb_is_local(self) -> bool:
        return not os.environ.get("HISTCODE_LANCEDB_URI")

    @property
    def lancedb_uri(self) -> str:
        """Where the vectors live: the workspace's ``data/lancedb``, or with ``$HISTCODE_LANCEDB_URI`` (a root on
        object storage such as ``s3://bucket/histcode/lancedb``; LanceDB reads the usual AWS_* variables) this
        workspace's folder under it, ``<root>/<project>``, so that workspaces sharing a bucket never share a
        table."""
        root = os.environ.get("HISTCODE_LANCEDB_URI")
        return f"{root.rstrip('/')}/{self.project()}" if root else str(self.lancedb_dir)

    @property
    def mlruns_dir(self) -> Path:
        return self.root / "mlruns"

    @property
    def mlflow_uri(self) -> str:
        """``$HISTCODE_MLFLOW_URI`` (an MLflow server, e.g. ``http://mlflow:5000``) or the workspace's SQLite store."""
        return os.environ.get("HISTCODE_MLFLOW_URI") or f"sqlite:///{self.mlruns_dir / 'mlflow.db'}"

    @property
    def mlflow_is_local(self) -> bool:
        return self.mlflow_uri.startswith("sqlite:///")

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def qc_dir(self, spec_id: str) -> Path:
        return self.outputs_dir / "qc" / spec_id

    def path(self, relative_or_absolute: str | Path) -> Path:
        """A path from params.yaml or a manifest: absolute as given, relative to the workspace root."""
        p = Path(relative_or_absolute).expanduser()
        return p if p.is_absolute() else self.root / p

    def ensure(self) -> Workspace:
        for d in (self.data_dir, self.mlruns_dir, self.outputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self


# --- who may read the workspace: private workspaces (umask 077) and making an existing one private ---

PRIVATE_ENV = "HISTCODE_PRIVATE"
PRIVATE_UMASK = 0o077
GROUP_OTHER = 0o077


def wants_private(cfg: HistcodeConfig | None) -> bool:
    """Whether files this invocation creates must be owner-only: ``workspace.private`` in params.yaml, or
    ``$HISTCODE_PRIVATE`` set to 1/true/yes (for a lab that sets it centrally; 0/false/no turns it off)."""
    env = os.environ.get(PRIVATE_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return cfg is not None and cfg.workspace.private


def store_paths(ws: Workspace) -> list[Path]:
    """The folders and files HistCode writes in a workspace (those that exist), the root first."""
    candidates = (ws.root, ws.data_dir, ws.catalog_path, ws.lancedb_dir, ws.mlruns_dir, ws.outputs_dir,
                  ws.metrics_dir, ws.project_file.parent)
    return [p for p in candidates if p.exists()]


def _tree(ws: Workspace):
    """The workspace root, then every entry below HistCode's stores (symbolic links not followed). The root is
    not walked whole: a workspace may be a source checkout, whose other files are not HistCode's."""
    yield ws.root
    for top in store_paths(ws)[1:]:
        if top.is_file():
            yield top
            continue
        yield top
        for folder, dirs, files in os.walk(top):
            for name in (*dirs, *files):
                yield Path(folder) / name


def open_entries(ws: Workspace, limit: int = 20000) -> list[Path]:
    """Entries of the workspace (root and stores) that the group or others may read or enter, up to ``limit``
    looked at."""
    import stat

    found = []
    for i, path in enumerate(_tree(ws)):
        if i >= limit:
            break
        try:
            st = path.lstat()
        except OSError:
            continue
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & GROUP_OTHER:
            found.append(path)
    return found


@dataclass(frozen=True)
class SecureReport:
    changed: list[tuple[Path, int, int]]  # (path, mode before, mode after)
    failed: list[tuple[Path, str]]  # (path, why: e.g. another user's file)
    looked_at: int


def secure_workspace(ws: Workspace) -> SecureReport:
    """Make a workspace owner-only: its root and every folder of its stores 0700, every file 0600 (an owner's
    execute bit kept). Symbolic links are left as they are (their targets may be outside). An entry that cannot
    be changed (another user's) is reported, not raised."""
    import stat

    changed, failed, looked = [], [], 0
    for path in _tree(ws):
        looked += 1
        try:
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            before = stat.S_IMODE(st.st_mode)
            after = 0o700 if stat.S_ISDIR(st.st_mode) else (before & 0o700) | 0o600
            if before != after:
                os.chmod(path, after)
                changed.append((path, before, after))
        except OSError as exc:
            failed.append((path, exc.strerror or str(exc)))
    return SecureReport(changed, failed, looked)
