"""A multi-node Ray cluster on this machine, as real `ray start` processes, for integration tests
and benchmarks.

Every node is a ``ray start --block`` process in its own session (process group) with its own
ports, so several nodes share one machine the way `ray.cluster_utils.Cluster` does, but each can
be killed on its own (SIGKILL the head's group = the head machine died). ``stop()`` stops what this
object started and nothing else: every process whose command line names this cluster's GCS
address or temp dirs. Not pytest-specific (benchmarks/scaling.py uses it too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    resources: dict = field(default_factory=dict)

    def kill(self) -> None:
        """SIGKILL the node's whole process group: the machine it stands for has died."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


class LocalRayCluster:
    """A Ray head plus worker nodes on this machine, each a separate `ray start` process.

    ``wrapper`` (per node) prefixes the command, e.g. ``["taskset", "-c", "0"]`` to give a node
    one core, or an ``unshare`` mount namespace in which the node cannot see a directory.
    """

    def __init__(self, root: Path | None = None, env: dict | None = None):
        # Ray's unix sockets live under the temp dir: keep its path short (a 107-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="rayc-", dir=root or "/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []
        # Ray 2.60's token authentication, on as in the compose deployment: every node and every
        # driver (``self.env``) reads the cluster's token from a file only this cluster uses.
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = (
            dict(os.environ)
            | {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_USAGE_STATS_ENABLED": "0",
                "OMP_NUM_THREADS": "1",  # trials inherit it: one thread per trial core
                "PYTHONUNBUFFERED": "1",
            }
            | (env or {})
        )

    # -- nodes ----------------------------------------------------------------------------------
    def start_head(self, num_cpus: int = 1, resources: dict | None = None, wrapper=()) -> RayNode:
        return self._start(
            "head",
            ["--head", f"--port={self.port}", "--include-dashboard=false"],
            num_cpus,
            resources,
            wrapper,
        )

    def add_worker(self, num_cpus: int = 1, resources: dict | None = None, wrapper=()) -> RayNode:
        name = f"worker{sum(n.name.startswith('worker') for n in self.nodes) + 1}"
        return self._start(name, [f"--address={self.address}"], num_cpus, resources, wrapper)

    def _start(self, name, args, num_cpus, resources, wrapper) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir(exist_ok=True)
        log = self.root / f"{name}.log"
        cmd = [
            *wrapper,
            RAY,
            "start",
            *args,
            "--block",
            "--node-ip-address=127.0.0.1",  # loopback only, like the GCS address
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}",
            f"--temp-dir={temp_dir}",
            "--object-store-memory=150000000",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        node = RayNode(name, proc, temp_dir, log, resources or {})
        self.nodes.append(node)
        return node

    @property
    def head(self) -> RayNode:
        return next(n for n in self.nodes if n.name == "head")

    # -- state ----------------------------------------------------------------------------------
    def alive_nodes(self) -> list[dict]:
        """Ray's view of the cluster (a short-lived driver in a subprocess)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps([{'node_id': n['NodeID'], 'resources': n['Resources']} "
            "for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"cannot query Ray at {self.address}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited:\n{self.log_tail(node)}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= count:
                    return nodes
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} Ray nodes did not come up in {timeout} s")
            time.sleep(1)

    def log_tail(self, node: RayNode, chars: int = 3000) -> str:
        return node.log.read_text(errors="replace")[-chars:]

    # -- teardown -------------------------------------------------------------------------------
    def _own_pids(self) -> list[int]:
        """Processes whose command line names this cluster (its GCS port or its temp dir)."""
        marks = (f"127.0.0.1:{self.port}", str(self.root))
        pids = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(m in cmdline for m in marks):
                pids.append(int(proc_dir.name))
        return pids

    def stop(self) -> None:
        """Kill every node's process group, then whatever of this cluster is left (workers
        the raylets started in sessions of their own). Throwaway clusters: no graceful drain
        (SIGTERM makes each node drain for up to 30 s). Safe to call twice."""
        for node in self.nodes:
            node.kill()
        kill_until_gone(self._own_pids)
        self.nodes = []

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def processes_with(mark: str) -> list[int]:
    """Processes (not this one) whose environment holds ``mark`` (``KEY=value``): everything a
    process started with it in its environment started in turn, Ray's workers included, whose
    command lines Ray rewrites."""
    needle = mark.encode() + b"\0"
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            if needle in (proc_dir / "environ").read_bytes() + b"\0":
                pids.append(int(proc_dir.name))
        except OSError:
            continue
    return pids


def kill_processes_with(mark: str) -> None:
    """SIGKILL every process whose environment holds ``mark``, until none is left."""
    kill_until_gone(lambda: processes_with(mark))


def kill_until_gone(find_pids) -> None:
    """SIGKILL what ``find_pids()`` lists until it lists nothing (processes may start others
    while they die), for up to ~10 s."""
    for _ in range(20):
        pids = find_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
