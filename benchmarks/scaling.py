"""Multi-node scaling: the same sweep on a native Ray cluster with one worker node, then with two.

Each configuration is a fresh cluster of real `ray start` processes on this machine (the
topology of tests/test_cluster.py): a head that offers trials no CPU, and worker nodes of one CPU
each, each pinned to its own core with `taskset` (node 1 on core 0, node 2 on core 1), so "a
node" is one core's worth of machine in both runs. The sweep is launched the way users launch it,
`ddpm-sweep run SWEEP --address HEAD --storage-path ...`, in a subprocess.

Key ``two_node_speedup``: the sweep's wall time (Tune's fit, from the summary the sweep records)
on one node over that on two nodes. The ideal is 2 for an even number of equal trials; what is
lost goes to the driver and Ray's own processes, which share the two cores unpinned, and to the
last round when the trials are uneven. ``cli_wall`` ratios include the driver's start-up.

    .venv/bin/python benchmarks/scaling.py --out /tmp/bench_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, environment, print_table, write_json

sys.path.insert(0, str(REPO_ROOT / "tests"))
from ray_nodes import LocalRayCluster  # noqa: E402

SWEEP = """\
name: {name}
base:
  data: {{name: gaussian_mixture, batch_size: 256, n_train: 4096}}
  network: {{name: mlp, hidden_dim: 128, num_blocks: 3}}
  diffusion: {{timesteps: 100, prediction: v}}
  train: {{max_steps: {steps}, lr: 3.0e-3, warmup_steps: 20, ema_decay: 0.99, p_uncond: 0.2,
          val_every_n_steps: {val_every}, bpd_subset: 0}}
  eval: {{num_samples: 160}}
search:
  diffusion.schedule: [linear, cosine]
  train.lr: {lrs}
  sample.variance: [fixed_small, fixed_large]
  sample.guidance: [0, 3]
  sample.steps: [20]
tune:
  metric: val/loss_simple
  cpus_per_trial: 1
  max_concurrent_trials: 4
"""


def run_configuration(nodes: int, args, tmp: Path) -> dict:
    name = f"scaling-{nodes}node"
    sweep_file = tmp / f"{name}.yaml"
    lrs = [3.0e-3, 1.0e-3, 2.0e-3][: max(1, args.trials // 2)]
    sweep_file.write_text(
        SWEEP.format(name=name, steps=args.steps, val_every=args.steps // 2, lrs=lrs)
    )
    tracking = f"sqlite:///{tmp / (name + '.db')}"
    with LocalRayCluster() as cluster:
        cluster.start_head(num_cpus=0)  # the head runs no trials, as in docker-compose.yml
        for core in range(nodes):
            cluster.add_worker(num_cpus=1, wrapper=["taskset", "-c", str(core % os.cpu_count())])
        cluster.wait_for_nodes(nodes + 1)
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable, "-m", "orchestrator.cli", "run", str(sweep_file),
                "--address", cluster.address, "--tracking-uri", tracking,
                "--storage-path", str(tmp / "storage"),
            ],
            cwd=tmp, env=cluster.env, capture_output=True, text=True, timeout=args.timeout,
        )  # fmt: skip
        cli_wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name)
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`ddpm_sweep.role` = 'sweep'", max_results=1
    )
    with tempfile.TemporaryDirectory() as d:
        summary = json.loads(
            Path(client.download_artifacts(parent.info.run_id, "summary.json", d)).read_text()
        )
    return {
        "worker_nodes": nodes,
        "trials": len(summary["trials"]),
        "trial_nodes": len({t["node_id"] for t in summary["trials"]}),
        "sweep_wall_s": summary["wall_seconds"],
        "cli_wall_s": cli_wall,
        "trial_seconds": summary["trial_seconds"],
        "errored": summary["errored"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=4, help="even: 2 schedules x trials/2 lrs")
    parser.add_argument("--steps", type=int, default=400, help="training steps per trial")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("needs 2 cores: one per worker node")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    runs = {}
    for nodes in (1, 2):
        print(f"=== {nodes} worker node(s) ===", flush=True)
        runs[nodes] = run_configuration(nodes, args, tmp)
        print(runs[nodes], flush=True)
    one, two = runs[1], runs[2]
    result = {
        "benchmark": "scaling",
        **environment(),
        "ray": __import__("ray").__version__,
        "settings": {"trials": args.trials, "steps": args.steps, "cores_per_node": 1},
        "two_node_speedup": one["sweep_wall_s"] / two["sweep_wall_s"],
        "two_node_speedup_cli_wall": one["cli_wall_s"] / two["cli_wall_s"],
        "trial_seconds_ratio": two["trial_seconds"] / one["trial_seconds"],
        "runs": runs,
        "load_average_1min": os.getloadavg()[0],
    }
    print_table(
        ["worker nodes", "trials", "nodes used", "sweep wall s", "CLI wall s", "trial s"],
        [
            [r["worker_nodes"], r["trials"], r["trial_nodes"], r["sweep_wall_s"],
             r["cli_wall_s"], r["trial_seconds"]]
            for r in runs.values()
        ],
    )  # fmt: skip
    print(f"two_node_speedup = {result['two_node_speedup']:.2f} (ideal 2)")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
