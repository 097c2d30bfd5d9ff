"""Where a sweep runs and keeps its state: connecting to Ray, and the Tune storage path.

On one machine the storage path is a local directory. On a cluster of several machines every
node writes its trials' checkpoints there and the driver reads them back, so it must be a
filesystem every node mounts at the same path (NFS, a shared volume) or an object-store URI
(``s3://bucket/prefix``, ``gs://...``, anything pyarrow opens). :func:`check_storage_visible`
proves that before any trial starts, by asking a task on every node to read a file the driver
just wrote there.

This module stays light (no torch, no Lightning): Ray workers import it for the probe task.
"""

from __future__ import annotations

import logging
import secrets
import socket
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "ddpm_sweep_runs"
PROBE_TIMEOUT_S = 180.0  # a task on every node: a fresh worker process each, on a busy cluster


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    return Path(path.removeprefix("file://")).resolve()


def experiment_location(storage_path: str | None, name: str) -> str:
    """``<storage>/<name>``: a resolved local directory, or a URI as given."""
    storage = storage_path or DEFAULT_STORAGE
    if is_uri(storage):
        return storage.rstrip("/") + "/" + name
    return str(local_path(storage) / name)


def _fs(location: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location)  # (filesystem, path inside it)


def write_text(location: str, name: str, text: str) -> None:
    if not is_uri(location):
        directory = local_path(location)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        return
    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as out:
        out.write(text.encode())


def read_text(location: str, name: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not is_uri(location):
        file = local_path(location) / name
        return file.read_text() if file.is_file() else None
    import pyarrow.fs

    fs, path = _fs(location)
    if fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{name}") as src:
        return src.read().decode()


def connect(address: str | None, log_to_driver: bool = True) -> None:
    """A local Ray started in-process (address None), or an existing cluster. Workers' output
    goes to Ray's log files, and to this console too when ``log_to_driver``."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver)


def _read_probe(path: str) -> tuple[str | None, str]:
    """Runs on one node: what that node sees at ``path`` (None: nothing), and its host name."""
    try:
        return Path(path).read_text(), socket.gethostname()
    except OSError:
        return None, socket.gethostname()


def check_storage_visible(storage_path: str | None, *, where: str = "--storage-path") -> None:
    """On a Ray cluster (``connect`` with an address), refuse a local storage path that a node
    cannot see: write a probe file there and read it back from a task pinned to every node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage = storage_path or DEFAULT_STORAGE
    if is_uri(storage):
        return  # an object store: every node reaches it the same way
    nodes = [n for n in ray.nodes() if n["Alive"]]
    directory = local_path(storage)
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    probe = directory / f".ddpm_sweep_probe_{token}"
    probe.write_text(token)
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = {
            n["NodeID"]: remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in nodes
        }
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
    finally:
        probe.unlink(missing_ok=True)
    blind = {node: host for node, (text, host) in seen.items() if text != token}
    if blind:
        names = ", ".join(f"{node[:12]} on {host}" for node, host in blind.items())
        raise ValueError(
            f"{where} {storage!r} ({directory}): {len(blind)} of {len(nodes)} Ray node(s) cannot "
            f"see it ({names}). On a cluster of several machines the Tune storage path must be "
            "a directory every node mounts at the same path (NFS, a shared volume: the compose "
            "file's /shared/ddpm_sweep_runs) or an object-store URI (s3://bucket/prefix, "
            "gs://bucket/prefix); pass it with --storage-path. Nothing was started."
        )
    log.info("storage path %s is visible to all %d Ray node(s)", directory, len(nodes))


def describe_cluster() -> dict:
    """Alive nodes and their CPUs and GPUs, for the sweep's summary."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    return {
        "nodes": len(nodes),
        "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes),
        "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes),
    }
