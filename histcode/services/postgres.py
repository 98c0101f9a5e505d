"""A throw-away PostgreSQL cluster from the distribution's packages (``initdb`` / ``pg_ctl``), listening on
127.0.0.1 only, for the MLflow and Prefect servers of the local stack and the tests.

PostgreSQL refuses to run as root, so a root process runs the cluster as the unprivileged ``postgres`` user the
Debian package creates (else ``nobody``), in a folder that user owns. Host connections need the password
(scram-sha-256); the password never appears on a command line: initdb reads it from a file that is removed
again, clients read it from a libpq password file (``PGPASSFILE``, mode 0600), which both psycopg2 and asyncpg
read."""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from histcode.services.processes import ServiceError, port_open, tail

log = logging.getLogger(__name__)

SUPERUSER = "histcode"
HOST = "127.0.0.1"


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else the newest /usr/lib/postgresql/<major>/bin (Debian keeps them there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise ServiceError(f"PostgreSQL's {name} is not installed: apt-get install postgresql "
                           "(scripts/install_postgres.sh does it)")
    return candidates[-1]


def service_user() -> str | None:
    """The user the cluster runs as: None (this one) unless this process is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServiceError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


@dataclass(frozen=True)
class PostgresCluster:
    """A cluster in ``root`` (``root/data``, ``root/postgres.log``) on ``port``."""

    root: Path
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def _as_user(self, argv: list[str]) -> list[str]:
        user = service_user()
        return ["runuser", "-u", user, "--", *argv] if user else argv

    def _run(self, argv: list[str], what: str, timeout: float = 120) -> str:
        done = subprocess.run(self._as_user(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
        if done.returncode != 0:
            raise ServiceError(f"PostgreSQL {what} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                               + (f"\n{tail(self.log_file)}" if self.log_file.exists() else ""))
        return done.stdout

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self, password: str) -> None:
        """initdb with ``histcode`` as superuser and ``password`` for host connections (once)."""
        if self.initialised:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        user = service_user()
        if user:
            shutil.chown(self.root, user)
        pwfile = self.root / ".initdb-password"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if user:
            shutil.chown(pwfile, user)
        try:
            self._run([pg_bin("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        options = f"-c listen_addresses={HOST} -p {self.port} -c unix_socket_directories=''"
        self.log_file.touch()
        if service_user():
            shutil.chown(self.log_file, service_user())
        self._run([pg_bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options, "-w",
                   "-t", str(int(timeout)), "start"], "start", timeout + 10)
        log.info("PostgreSQL on %s:%d (%s)", HOST, self.port, self.data_dir)

    def stop(self, mode: str = "fast") -> None:
        if self.initialised and self.running:
            self._run([pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"], "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return self.pid is not None and port_open(HOST, self.port)

    def create_database(self, name: str, password: str) -> None:
        """``name`` owned by the superuser, unless it exists."""
        import psycopg2

        con = psycopg2.connect(host=HOST, port=self.port, user=SUPERUSER, password=password, dbname="postgres")
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cur.fetchall():
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A connection URL without the password (clients take it from ``PGPASSFILE``)."""
        return f"{driver}://{SUPERUSER}@{HOST}:{self.port}/{database}"


def write_passfile(path: Path, port: int, password: str) -> Path:
    """A libpq password file (host:port:database:user:password, mode 0600) for the cluster's superuser."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    path.write_text(f"{HOST}:{port}:*:{SUPERUSER}:{escaped}\n")
    return path
