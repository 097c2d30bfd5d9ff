"""Throwaway native services for integration tests and benchmarks: PostgreSQL and `mlflow server`.

`PostgresCluster` is a private PostgreSQL cluster (initdb, pg_ctl) on a free loopback port with one
database and one password user; `MlflowServer` is `mlflow server` on that backend with proxied
artifacts, as a deployment runs it (`mlflow_security_options`). Both are context managers, can be
stopped and started again on the same port and data (the fault tests need that), and put the tail
of their log into every error. Neither needs Docker or pytest (benchmarks and multi-node scripts
use them too; the module imports pytest, a dev dependency, only to define the fixtures at the
end). `require_service` is the fixtures' skip-or-fail policy: a PostgreSQL that cannot start
skips a test on a laptop and fails it in CI.

    with service_tmpdir() as tmp, PostgresCluster(tmp / "pg") as pg, \\
            MlflowServer(pg.uri, tmp / "artifacts", tmp / "mlflow") as server:
        client = mlflow.MlflowClient(server.url)
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; as root, its commands run as this OS user.
PG_OS_USER = "postgres"


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message ends with the tail of its log."""


# --- small helpers ------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it; another process may race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist (yet)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def service_tmpdir(prefix: str = "ddpm-sweep-services-") -> Iterator[Path]:
    """A temporary directory that the `postgres` OS user can traverse, removed afterwards.

    pytest's `tmp_path` lies under a root-only (0700) directory, where PostgreSQL, run as the
    `postgres` user, cannot reach its data directory; this one is created in the system temp
    directory and made traversable (0711) but not listable.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgrp) of every live (not zombie) process, read from /proc."""
    table = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:  # the process exited while we looked
            continue
        # Field 2 (comm) is in parentheses and may hold spaces; state, ppid and pgrp follow it.
        state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
        if state not in ("Z", "X"):
            table.append((int(stat.split("/")[2]), int(ppid), int(pgrp)))
    return table


def group_processes(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid`."""
    return sorted(pid for pid, _, pgrp in _process_table() if pgrp == pgid)


def process_tree(pid: int) -> list[int]:
    """`pid` (if alive) and its live descendants, however they regrouped themselves."""
    table = _process_table()
    alive = {p for p, _, _ in table}
    tree, frontier = set(), {pid} & alive
    while frontier:
        tree |= frontier
        frontier = {p for p, ppid, _ in table if ppid in frontier} - tree
    return sorted(tree)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- PostgreSQL -----------------------------------------------------------------------------------


def find_pg_binary(name: str) -> str:
    """`name` (initdb, pg_ctl) from PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    raise ServiceError(
        f"{name} not found on PATH or in /usr/lib/postgresql/*/bin; install postgresql"
    )


class PostgresCluster:
    """A private PostgreSQL cluster in `tmpdir`, listening on 127.0.0.1 only.

    `start()` runs initdb the first time, then `pg_ctl start`, and the first time creates the
    database `database` owned by the login role `user` with a random password: `uri` is what
    `mlflow server --backend-store-uri` takes. Clients authenticate with that password
    (scram-sha-256) over loopback TCP; the superuser `postgres` connects only through the unix
    socket inside `tmpdir` (trust), for `admin_connect()`. Data, socket and the server log
    (`log_path`) all live in `tmpdir`, which the `postgres` OS user must be able to traverse when
    we run as root (see `service_tmpdir`).
    """

    def __init__(
        self,
        tmpdir: Path | str,
        *,
        port: int | None = None,
        database: str = "mlflow",
        user: str = "mlflow",
        password: str | None = None,
        timeout: float = 60.0,
    ):
        self.root = Path(tmpdir)
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.database = database
        self.user = user
        self.password = password or secrets.token_hex(16)
        self.timeout = timeout

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the database, as the `user` role over loopback TCP.

        It names the driver: SQLAlchemy 2.1 made psycopg (3) the default for `postgresql://`,
        and the dev extra installs psycopg2.
        """
        credentials = f"{self.user}:{self.password}"
        address = f"{self.host}:{self.port}"
        return f"postgresql+psycopg2://{credentials}@{address}/{self.database}"

    def __repr__(self) -> str:
        return f"PostgresCluster({str(self.root)!r}, port={self.port})"

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # lifecycle

    def start(self) -> PostgresCluster:
        """Initialise (once), start and wait until the server accepts connections; returns self."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if not self.running:
            self._pg_ctl("start", "-w", "-t", str(int(self.timeout)), "-l", str(self.log_path))
        self._create_database()
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected, data is checkpointed).

        Does nothing when it is not running, so it is safe to call twice. Escalates to an
        immediate shutdown, then SIGKILL, if the fast one does not finish in `timeout`.
        """
        pid = self.pid
        if pid is None or not pid_alive(pid):
            return
        try:
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(self.timeout)))
        except ServiceError:
            log.warning("fast shutdown of %r failed; trying an immediate one", self)
            with contextlib.suppress(ServiceError):
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "10")
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if not _wait_until(lambda: not pid_alive(pid), 10):
            raise ServiceError(f"postgres (pid {pid}) survived SIGKILL\n{log_tail(self.log_path)}")

    def restart(self) -> None:
        """Stop (fast) and start again: same port, same data, same password."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, or None when the server is not running."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def admin_connect(self, dbname: str = "postgres"):
        """A psycopg2 connection as the superuser, through the private unix socket."""
        import psycopg2

        return psycopg2.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname
        )

    def connect(self):
        """A psycopg2 connection to `database` as `user`, over loopback TCP with the password."""
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
        )

    # steps

    def _initdb(self) -> None:
        for path in (self.root, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._chown_to_server_user(self.root, self.socket_dir)
        self.socket_dir.chmod(0o700)  # only the server user (and root) may use the trust socket
        self._run(
            find_pg_binary("initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster: skip initdb's final fsync (seconds on slow disks)
        )  # fmt: skip
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# ddpm-sweep tests/services.py\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
            )
        (self.data_dir / "pg_hba.conf").write_text(
            "# tests/services.py: the superuser on the private socket, the rest by password\n"
            "local all postgres trust\n"
            f"host {self.database} {self.user} 127.0.0.1/32 scram-sha-256\n"
        )

    def _create_database(self) -> None:
        """Create the role and the database unless they exist (a restart finds them)."""
        try:
            import psycopg2  # noqa: F401  (the MLflow server needs the same driver)
        except ImportError as exc:
            raise ServiceError("psycopg2 is not installed; pip install psycopg2-binary") from exc
        conn = self.admin_connect()
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,))
                if not cur.fetchone():
                    cur.execute(f"CREATE ROLE {self.user} LOGIN PASSWORD %s", (self.password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")
        finally:
            conn.close()

    def _pg_ctl(self, *args: str) -> None:
        self._run(find_pg_binary("pg_ctl"), "-D", str(self.data_dir), *args)

    def _run(self, *cmd: str) -> None:
        """Run a PostgreSQL program as the server's OS user; ServiceError with the log tail."""
        try:
            result = subprocess.run(
                [*_as_server_user(), *cmd],
                cwd=self.root,  # the server user may not be able to read our cwd
                capture_output=True,
                text=True,
                timeout=self.timeout + 30,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{cmd[0]} timed out\n{log_tail(self.log_path)}") from exc
        if result.returncode != 0:
            raise ServiceError(
                f"{' '.join(cmd)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{log_tail(self.log_path)}"
            )

    @staticmethod
    def _chown_to_server_user(*paths: Path) -> None:
        if os.geteuid() == 0:
            user = _server_user()
            for path in paths:
                os.chown(path, user.pw_uid, user.pw_gid)


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise ServiceError(
            f"running as root but there is no {PG_OS_USER!r} OS user to run PostgreSQL as"
        ) from None


def _as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL program as a non-root user (empty if not root)."""
    if os.geteuid() != 0:
        return []
    _server_user()
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceError("running as root and runuser not found on PATH (util-linux)")
    return [runuser, "-u", PG_OS_USER, "--"]


# --- mlflow server --------------------------------------------------------------------------------


def mlflow_security_options(
    port: int, hostnames: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> list[str]:
    """The `mlflow server` security flags a deployment sets, for the names clients use.

    Only these Host headers are accepted (DNS-rebinding protection), only these origins get CORS
    answers, and the UI may not be framed. The one list: the docker-compose file is checked
    against it.
    """
    hosts = [f"{name}:{port}" for name in hostnames]
    return [
        "--allowed-hosts", ",".join(hosts),
        "--cors-allowed-origins", ",".join(f"http://{host}" for host in hosts),
        "--x-frame-options", "DENY",
    ]  # fmt: skip


def _mlflow_executable() -> str:
    beside_python = Path(sys.executable).parent / "mlflow"  # the venv's, not one on PATH
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("mlflow")
    if found is None:
        raise ServiceError("mlflow not found next to the Python interpreter or on PATH")
    return found


class MlflowServer:
    """`mlflow server` on `backend_uri`, proxying artifacts to `artifacts_dir`, on 127.0.0.1.

    The server runs in its own process group (the CLI forks uvicorn and, with `job_execution`,
    a job runner that forks seven huey consumers), so `stop()` ends all of it: SIGTERM to the
    group, SIGKILL after `stop_timeout`. `start()` after `stop()` brings it back on the same
    port. stdout and stderr go to `log_path` in `tmpdir`.

    `job_execution` is off by default: MLflow's job runner serves its GenAI jobs (LLM judges,
    trace archival), which ddpm-sweep never submits, and on a 2-core machine it triples the
    CPU a server start costs (about 23 s instead of 8 s). `env` adds environment variables.
    """

    def __init__(
        self,
        backend_uri: str,
        artifacts_dir: Path | str,
        tmpdir: Path | str,
        *,
        port: int | None = None,
        workers: int = 1,
        job_execution: bool = False,
        env: dict[str, str] | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 15.0,
    ):
        self.backend_uri = backend_uri
        self.artifacts_dir = Path(artifacts_dir)
        self.root = Path(tmpdir)
        self.log_path = self.root / "mlflow-server.log"
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.workers = workers
        self.env = {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if job_execution else "false",
            **(env or {}),
        }
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            _mlflow_executable(), "server",
            "--backend-store-uri", self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
            *mlflow_security_options(self.port),
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"MlflowServer({self.url})"

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> MlflowServer:
        """Start the server and wait until GET /health answers; returns self."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            log_file.write(
                f"\n=== start {time.strftime('%H:%M:%S')}: port {self.port} ===\n".encode()
            )
            log_file.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals all of it
            )
        if not _wait_until(self._healthy_or_exited, self.start_timeout, interval=0.25):
            self.stop()
            raise ServiceError(
                f"{self!r} not healthy after {self.start_timeout:.0f} s\n{log_tail(self.log_path)}"
            )
        if self.proc.poll() is not None:
            code = self.proc.returncode
            self.stop()
            raise ServiceError(f"{self!r} exited with {code}\n{log_tail(self.log_path)}")
        return self

    def healthy(self) -> bool:
        """Whether GET /health answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:  # refused, reset, timed out; URLError and HTTPError are OSErrors too
            return False

    def _healthy_or_exited(self) -> bool:
        return self.proc.poll() is not None or self.healthy()

    def processes(self) -> list[int]:
        """Live pids of the server: its process group and every descendant (empty once stopped)."""
        if self.proc is None:
            return []
        return sorted(set(group_processes(self.proc.pid)) | set(process_tree(self.proc.pid)))

    def stop(self) -> None:
        """SIGTERM the server's processes, SIGKILL what is left after `stop_timeout`; reaps.

        Signals the process group and, in case one left the group, every descendant found
        before signalling. Safe to call twice. Raises ServiceError if a process survives SIGKILL.
        """
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        pids = self.processes()

        def left() -> list[int]:
            self.proc.poll()  # reap the leader; the others are reaped by init
            return sorted(set(group_processes(pgid)) | {p for p in pids if pid_alive(p)})

        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            for pid in left():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if _wait_until(lambda: not left(), self.stop_timeout):
                return
            log.warning("%r: %s still alive after %s", self, left(), sig.name)
        raise ServiceError(f"{self!r}: {left()} survived SIGKILL\n{log_tail(self.log_path)}")


# --- pytest side ----------------------------------------------------------------------------------
# A test module imports the fixtures by their function names (`mlflow_server_fixture`,
# `postgres_fixture`, an unused import to ruff) and its tests ask for them by fixture name
# (`def test_x(mlflow_server, postgres)`): importing `postgres` itself would trip ruff's F811.


def require_service(reason: str) -> NoReturn:
    """A needed service cannot run here: fail the test under CI (CI=true), skip it elsewhere."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI must provide this service: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="postgres")
def postgres_fixture() -> Iterator[PostgresCluster]:
    """A fresh running PostgreSQL cluster (database and user `mlflow`), stopped afterwards.

    Skips the test (fails it under CI) when PostgreSQL cannot start here.
    """
    with service_tmpdir() as tmp:
        cluster = PostgresCluster(tmp / "pg")
        failure = None
        try:
            cluster.start()
        except ServiceError as exc:
            cluster.stop()
            failure = f"PostgreSQL cannot start: {exc}"
        if failure:
            require_service(failure)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(name="mlflow_server")
def mlflow_server_fixture(postgres: PostgresCluster, tmp_path: Path) -> Iterator[MlflowServer]:
    """`mlflow server` on the `postgres` fixture, artifacts in tmp_path/artifacts, stopped after."""
    with MlflowServer(postgres.uri, tmp_path / "artifacts", tmp_path / "mlflow") as server:
        yield server
