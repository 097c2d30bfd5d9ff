"""ASHA on the validation loss against ASHA on sample quality (`eval.periodic`): the best final
FID each finds, with its interval, and the trial-seconds each spends.

Two sweeps on the bundled digits, identical but for what ASHA stops trials on, each run as a user
runs it (`ddpm-sweep run FILE --name NAME` in a subprocess, `OMP_NUM_THREADS=1`, its own sqlite
MLflow file and Tune storage in a temp folder):

* **loss**: `tune.metric: val/loss_simple`, `mode: min`, no periodic evaluation (a user stopping
  on the loss does not pay for sampling during training);
* **quality**: `tune.metric: eval/fid`, `mode: min`, with `eval.periodic.every_n_steps` =
  `train.val_every_n_steps`: at every validation each trial samples the default periodic cell
  (w = 1, 10 steps, `eval.periodic.num_samples` samples) with its EMA weights and reports the FID
  to Tune. This arm pays for it; its cost is reported (`periodic_*` keys). `--both-periodic`
  gives the loss arm the same periodic evaluation (then only the metric differs).

Same search space, budget and seeds in both: `search_alg: grid` over `diffusion.schedule` x
`train.lr` (default {linear, cosine, sigmoid} x {5e-4, 2e-3, 8e-3}: 9 trainings),
`scheduler: asha`, `grace_period` 1, `reduction_factor` 2, 400 steps with a validation (one ASHA
report) every 100, 2 trials at a time, 1 CPU each; the final grid is one cell, w = 1,
`fixed_small`, 25 steps, 200 samples, scored with its 95 % bootstrap interval. A grid, so
that both arms train exactly the same configurations. The space is chosen where
the loss cannot rank: `val/loss_simple` averages the epsilon error over each schedule's own noise
levels, so it is lower for linear whatever the samples look like (docs/studies/schedules.md:
0.081 linear, 0.139 cosine, 0.131 sigmoid after 2,000 steps); the learning rate is an axis on
which loss and FID may agree. The shipped `asha_search.yaml` searches a schedule under ASHA on
the loss.

Keys, per arm (`arms.<arm>`): `best` (the FINISHED eval run with the lowest `fid`: `fid`,
`fid_ci_low`, `fid_ci_high`, its training's schedule and lr), `trial_seconds` (the sweep's
`summary.json` `trial_seconds`: the sum over trials of Tune's `time_total_s`, each trial's own
process time from its start to its last report, stopped trials to the report they were stopped
at; the per-trial values are Tune's `result.json`), `mlflow_train_run_seconds` (the training
runs' end - start, beside it), `wall_s` (the `ddpm-sweep run` command), `stopped` (training runs
KILLED: stopped by ASHA; `stopped_after_last_step`: of them, those stopped at the validation
after their last step, trained in full and never evaluated), `training_steps`, `finished`,
`failed`, `periodic_eval_fraction_mean` (mean of the finished trials'
`time/periodic_eval_fraction`: the product reports it only for trials that finish training) and
`periodic_share_all_trials` (every trial's last `eval/periodic_seconds` over all trials'
`time_total_s`, stopped ones included). Across arms: `quality_minus_loss_fid` with its paired
95 % interval (both final cells use the same `sample.seed`, so their bootstrap replicates pair;
`bootstrap.json` of the two best runs), `winner` (`within noise` when that interval holds 0),
`quality_over_loss_trial_seconds` (and `_training_steps`, which no load moves), and
`loss_vs_fid_spearman`: in the quality arm's trials, at each validation step, the rank
correlation across trials of `val/loss_simple` with `eval/fid` (1 = the loss ranks the trials as
the samples do).

`--reference` runs a third sweep after them: the same trainings under FIFO with the periodic
evaluation, every one trained to the end and evaluated (~8 minutes more). It gives the best that
any stopping rule could have kept, `minus_reference_fid.<arm>` (each arm's best against it,
paired), and the loss-vs-FID correlation over all trainings at every step rather than over the
quality arm's survivors.

About 12 minutes on this 2-core CPU (two sweeps of ~5 minutes and their start-up); trial-seconds
are absolute seconds on a shared machine: compare the arms' ratio, not the seconds. A smoke run
(~2 minutes): `--schedules linear,cosine --lrs 2e-3 --max-steps 40 --val-every 20
--eval-samples 50 --periodic-samples 50`.

    .venv/bin/python benchmarks/asha_on_quality.py --out /tmp/bench_asha_on_quality.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import _sweeps
import numpy as np
import yaml

ARMS = {  # arm -> (tune.metric, tune.mode)
    "loss": ("val/loss_simple", "min"),
    "quality": ("eval/fid", "min"),
    "reference": ("eval/fid", "min"),  # --reference: FIFO, every training to the end
}
CONFIDENCE = 0.95


def parse_args():
    p = _common.parser(__doc__)
    p.add_argument("--schedules", default="linear,cosine,sigmoid", help="diffusion.schedule grid")
    p.add_argument("--lrs", default="5e-4,2e-3,8e-3", help="train.lr grid")
    p.add_argument("--max-steps", type=int, default=400, help="base.train.max_steps")
    p.add_argument("--val-every", type=int, default=100, help="train.val_every_n_steps")
    p.add_argument("--grace-period", type=int, default=1, help="tune.grace_period (reports)")
    p.add_argument("--reduction-factor", type=int, default=2, help="tune.reduction_factor")
    p.add_argument("--concurrency", type=int, default=2, help="tune.max_concurrent_trials")
    p.add_argument("--eval-samples", type=int, default=200, help="final grid's eval.num_samples")
    p.add_argument("--periodic-samples", type=int, default=100, help="eval.periodic.num_samples")
    p.add_argument("--sample-steps", type=int, default=25, help="final cell's sampling steps")
    p.add_argument(
        "--both-periodic",
        action="store_true",
        help="the loss arm samples periodically too (default: only the quality arm pays for it)",
    )
    p.add_argument("--order", choices=["loss-first", "quality-first"], default="loss-first")
    p.add_argument(
        "--reference",
        action="store_true",
        help="a third sweep after the two: the same trainings under FIFO with periodic "
        "evaluation, all trained to the end (the best any stopping rule could keep; ~8 min)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra `ddpm-sweep run` override for both arms, e.g. base.train.ema_decay=0.995",
    )
    p.add_argument("--keep", help="keep the work folder here (MLflow files, Tune storage, logs)")
    return p.parse_args()


def _csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def sweep_file(args, arm: str) -> dict:
    metric, mode = ARMS[arm]
    periodic = arm != "loss" or args.both_periodic
    evaluation = {"num_samples": args.eval_samples}
    if periodic:
        evaluation["periodic"] = {
            "every_n_steps": args.val_every,
            "num_samples": args.periodic_samples,
        }
    return {
        "name": f"asha-{arm}",
        "base": {
            "data": {"name": "digits", "batch_size": 64},
            "network": {"name": "unet", "preset": "digits"},
            "diffusion": {"timesteps": 1000, "prediction": "eps", "variance": "fixed_small"},
            "train": {
                "max_steps": args.max_steps,
                "warmup_steps": min(50, args.max_steps // 4),
                "ema_decay": 0.99,
                "p_uncond": 0.1,
                "val_every_n_steps": args.val_every,
                "bpd_subset": 0,
            },
            "sample": {
                "steps": [args.sample_steps],
                "variance": ["fixed_small"],
                "guidance": [1],
                "per_class": 10,
            },
            "eval": evaluation,
        },
        "search": {
            "diffusion.schedule": _csv(args.schedules),
            "train.lr": _csv(args.lrs, float),
        },
        "tune": {
            "search_alg": "grid",
            "scheduler": "fifo" if arm == "reference" else "asha",
            "metric": metric,
            "mode": mode,
            "grace_period": args.grace_period,
            "reduction_factor": args.reduction_factor,
            "max_concurrent_trials": args.concurrency,
            "cpus_per_trial": 1,
            "seed": 0,
        },
    }


def ddpm_sweep(*argv: str, cwd: Path, log: Path | None = None) -> float:
    """Runs the CLI in ``cwd`` (one thread per process); its wall seconds. Exit 1 (some trial
    failed) is recorded by the caller from MLflow, anything else raises."""
    exe = Path(sys.executable).parent / "ddpm-sweep"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        rc = subprocess.run([str(exe), *argv], cwd=cwd, env=env, stdout=out, stderr=out).returncode
    seconds = time.perf_counter() - start
    if rc not in (0, 1):
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"ddpm-sweep {argv[0]} exited {rc}:\n{tail}")
    return seconds


def run_arm(args, arm: str, work: Path) -> dict:
    folder = work / arm
    folder.mkdir(parents=True)
    path = folder / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(sweep_file(args, arm), sort_keys=False))
    name = f"asha-{arm}"
    overrides = list(args.override)
    ddpm_sweep("plan", str(path), *overrides, cwd=folder, log=folder / "plan.log")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    load = os.getloadavg()[0]
    print(f"=== {arm}: ddpm-sweep run {path.name} ({folder}) ===", flush=True)
    wall = ddpm_sweep(
        "run", str(path), *overrides, "--name", name, "--tracking-uri", uri,
        "--storage-path", str(folder / "ddpm_sweep_runs"), cwd=folder, log=folder / "run.log",
    )  # fmt: skip
    print(f"=== {arm}: {wall:.0f} s wall ===", flush=True)
    record = read_arm(uri, name, folder / "ddpm_sweep_runs" / name, args.max_steps)
    record |= {
        "metric": ARMS[arm][0],
        "periodic": arm != "loss" or args.both_periodic,
        "wall_s": wall,
        "load_average_1min": [load, os.getloadavg()[0]],
        "sweep_file": yaml.safe_load(path.read_text()),
    }
    return record


def read_arm(uri: str, name: str, tune_dir: Path, max_steps: int) -> dict:
    """One arm's figures from its MLflow file and Tune storage."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    parent = client.search_runs([exp.experiment_id], "tags.`ddpm_sweep.role` = 'sweep'")
    summary = {}
    if parent:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(parent[0].info.run_id, "summary.json", tmp)
                summary = json.loads(Path(local).read_text())
            except Exception as err:  # noqa: BLE001 - recorded, the rest still read
                summary = {"error": repr(err)}
    tune_results = _sweeps.read_tune_results(tune_dir)  # each trial's last result, by id
    trains = client.search_runs(
        [exp.experiment_id], "tags.`ddpm_sweep.role` = 'train'", max_results=1000
    )
    evals = client.search_runs(
        [exp.experiment_id], "tags.`ddpm_sweep.role` = 'eval'", max_results=1000
    )
    evals_by_train = {r.data.tags.get("ddpm_sweep.train_run_id"): r for r in evals}
    trials = []
    for run in sorted(trains, key=lambda r: r.info.start_time):
        p, m = run.data.params, run.data.metrics
        history = {
            key: [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, key)]
            for key in ("val/loss_simple", "eval/fid", "eval/periodic_seconds")
        }
        result = tune_results.get(run.data.tags.get("ddpm_sweep.trial_id"), {})
        ev = evals_by_train.get(run.info.run_id)
        trials.append(
            {
                "run_name": run.info.run_name,
                "run_id": run.info.run_id,
                "schedule": p.get("diffusion.schedule"),
                "lr": float(p["train.lr"]),
                "status": run.info.status,
                "last_step": max((s for s, _ in history["val/loss_simple"]), default=None),
                "time_total_s": result.get("time_total_s"),
                "training_iterations": result.get("training_iteration"),
                "mlflow_run_seconds": (run.info.end_time - run.info.start_time) / 1000
                if run.info.end_time
                else None,
                "periodic_seconds": history["eval/periodic_seconds"][-1][1]
                if history["eval/periodic_seconds"]
                else 0.0,
                "periodic_eval_fraction": m.get("time/periodic_eval_fraction"),
                "history": history,
                "final": None
                if ev is None
                else {
                    "status": ev.info.status,
                    "run_id": ev.info.run_id,
                    **{
                        k: ev.data.metrics.get(k)
                        for k in ("fid", "fid_ci_low", "fid_ci_high", "sample_seconds")
                    },
                },
            }
        )
    by_status = {s: sum(t["status"] == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    finished_evals = [
        t for t in trials if t["final"] and t["final"]["status"] == "FINISHED" and t["final"]["fid"]
    ]
    best = min(finished_evals, key=lambda t: t["final"]["fid"], default=None)
    fractions = [t["periodic_eval_fraction"] for t in trials if t["periodic_eval_fraction"]]
    tune_seconds = [t["time_total_s"] or 0.0 for t in trials]
    return {
        "trials": trials,
        "trainings": len(trials),
        "finished": by_status["FINISHED"],
        "stopped": by_status["KILLED"],
        # stopped at the last validation, after every step: trained in full, never evaluated
        "stopped_after_last_step": sum(
            t["status"] == "KILLED" and t["last_step"] == max_steps - 1 for t in trials
        ),
        "failed": by_status["FAILED"],
        "training_steps": sum((t["last_step"] or 0) + 1 for t in trials),
        "trial_seconds": summary.get("trial_seconds"),
        "trial_seconds_from_results": sum(tune_seconds),
        "mlflow_train_run_seconds": sum(t["mlflow_run_seconds"] or 0.0 for t in trials),
        "sweep_wall_seconds": summary.get("wall_seconds"),
        "periodic_eval_fraction_mean": float(np.mean(fractions)) if fractions else None,
        "periodic_seconds": sum(t["periodic_seconds"] for t in trials),
        "periodic_share_all_trials": sum(t["periodic_seconds"] for t in trials) / sum(tune_seconds)
        if sum(tune_seconds)
        else None,
        "best": None
        if best is None
        else {
            "schedule": best["schedule"],
            "lr": best["lr"],
            "training_run": best["run_name"],
            "eval_run_id": best["final"]["run_id"],
            **{k: best["final"][k] for k in ("fid", "fid_ci_low", "fid_ci_high")},
        },
        "tracking_uri": uri,
    }


def paired_difference(arms: dict, a: str = "quality", b: str = "loss") -> dict:
    """a's best fid - b's best fid, with the interval of their bootstrap replicates'
    differences (the same sample.seed and eval settings: replicate k of each used the same
    resampling counts)."""
    import mlflow

    from orchestrator.compare import artifact_loader, interval

    reps = {}
    for arm in (a, b):
        best = arms[arm]["best"]
        if best is None:
            return {"error": f"{arm}: no finished evaluation"}
        client = mlflow.MlflowClient(arms[arm]["tracking_uri"])
        loaded = artifact_loader(client)(client.get_run(best["eval_run_id"]))
        if loaded is None:
            return {"error": f"{arm}: no bootstrap.json"}
        reps[arm] = loaded
    ra, rb = reps[a], reps[b]
    diff = arms[a]["best"]["fid"] - arms[b]["best"]["fid"]
    out = {"difference": diff, "same_seed": ra["seed"] == rb["seed"]}
    if ra["seed"] != rb["seed"] or ra["resamples"] != rb["resamples"]:
        return out | {"error": "replicates not paired (seed or resamples differ)"}
    d = np.asarray(ra["metrics"]["fid"]) - np.asarray(rb["metrics"]["fid"])
    low, high = interval(diff, d, CONFIDENCE)
    return out | {"ci_low": low, "ci_high": high, "replicate_correlation": _corr(ra, rb)}


def verdict(paired: dict, a: str, b: str) -> str | None:
    if "ci_low" not in paired:
        return None
    if paired["ci_low"] <= 0 <= paired["ci_high"]:
        return "within noise"
    return a if paired["ci_high"] < 0 else b


def _corr(a: dict, b: dict) -> float:
    x, y = np.asarray(a["metrics"]["fid"]), np.asarray(b["metrics"]["fid"])
    return float(np.corrcoef(x, y)[0, 1]) if x.std() and y.std() else math.nan


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for v in set(values):  # ties: their mean rank
        tied = [i for i, x in enumerate(values) if x == v]
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() and ry.std() else math.nan


def loss_vs_fid(trials: list[dict]) -> list[dict]:
    """At each validation step: across the trials that logged both there, the Spearman
    correlation of val/loss_simple with eval/fid, and the trial each ranks first."""
    steps = sorted({s for t in trials for s, _ in t["history"]["eval/fid"]})
    rows = []
    for step in steps:
        pairs = []
        for t in trials:
            loss = dict(t["history"]["val/loss_simple"]).get(step)
            fid = dict(t["history"]["eval/fid"]).get(step)
            if loss is not None and fid is not None:
                pairs.append((loss, fid, f"{t['schedule']} lr={t['lr']:g}"))
        if not pairs:
            continue
        rows.append(
            {
                "step": step + 1,  # logged at global_step - 1: the validation after step+1 steps
                "trials": len(pairs),
                "spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
                "best_by_loss": min(pairs, key=lambda p: p[0])[2],
                "best_by_fid": min(pairs, key=lambda p: p[1])[2],
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.perf_counter()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-asha-on-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    order = ["loss", "quality"] if args.order == "loss-first" else ["quality", "loss"]
    arms = {}
    try:
        for arm in order:
            arms[arm] = run_arm(args, arm, work)
        if args.reference:
            arms["reference"] = run_arm(args, "reference", work)
        paired = paired_difference(arms)
        against_reference = {
            arm: paired_difference(arms, arm, "reference")
            for arm in ("quality", "loss")
            if "reference" in arms
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    q, lo = arms["quality"], arms["loss"]
    winner = verdict(paired, "quality", "loss")
    seconds_ratio = (
        q["trial_seconds"] / lo["trial_seconds"]
        if q["trial_seconds"] and lo["trial_seconds"]
        else None
    )
    result = {
        "benchmark": "asha_on_quality",
        **_common.environment(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")}
        | {
            "order": order,
            "trial_seconds": "the sweep's summary.json trial_seconds: the sum of Tune's "
            "time_total_s over the trials (a stopped trial: up to the report it was stopped at)",
        },
        "arms": arms,
        "quality_minus_loss_fid": paired,
        "winner": winner,
        "quality_over_loss_trial_seconds": seconds_ratio,
        "quality_over_loss_wall_s": q["wall_s"] / lo["wall_s"],
        "quality_over_loss_training_steps": q["training_steps"] / lo["training_steps"],
        "minus_reference_fid": against_reference,
        "loss_vs_fid_spearman": loss_vs_fid(arms.get("reference", q)["trials"]),
        "loss_vs_fid_spearman_arm": "reference" if "reference" in arms else "quality",
        "elapsed_s": time.perf_counter() - started,
    }

    print(f"\n{result['device']}, torch {result['torch']}")
    _common.print_table(
        ["arm", "trials", "stopped", "steps", "best (schedule, lr)", "best fid [95 % CI]",
         "trial s", "wall s", "periodic frac"],
        [
            [
                arm,
                a["trainings"],
                a["stopped"],
                a["training_steps"],
                f"{a['best']['schedule']}, {a['best']['lr']:g}" if a["best"] else "-",
                f"{a['best']['fid']:.2f} [{a['best']['fid_ci_low']:.2f}, "
                f"{a['best']['fid_ci_high']:.2f}]"
                if a["best"]
                else "-",
                a["trial_seconds"],
                a["wall_s"],
                a["periodic_eval_fraction_mean"] if a["periodic"] else "-",
            ]
            for arm, a in arms.items()
        ],
    )  # fmt: skip
    print("\nper trial")
    for arm, a in arms.items():
        for t in a["trials"]:
            fin = t["final"]
            print(
                f"  {arm:8s} {t['schedule']:8s} lr={t['lr']:<7g} {t['status']:8s} "
                f"steps {(t['last_step'] or 0) + 1:4d}  tune {t['time_total_s'] or 0:6.1f} s  "
                + (f"final fid {fin['fid']:.2f}" if fin and fin["fid"] else "no final eval")
            )
    print(f"\n{result['loss_vs_fid_spearman_arm']} arm, at each validation:")
    _common.print_table(
        ["step", "trials", "spearman(loss, fid)", "best by loss", "best by fid"],
        [
            [r["step"], r["trials"], r["spearman"], r["best_by_loss"], r["best_by_fid"]]
            for r in result["loss_vs_fid_spearman"]
        ],
    )
    if "ci_low" in paired:
        print(
            f"quality - loss best fid: {paired['difference']:+.2f} "
            f"[{paired['ci_low']:+.2f}, {paired['ci_high']:+.2f}] (paired, 95 %): {winner}"
        )
    else:
        print(f"quality - loss best fid: {paired}")
    for arm, d in against_reference.items():
        if "ci_low" in d:
            print(
                f"{arm} - reference best fid: {d['difference']:+.2f} "
                f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
            )
    if seconds_ratio:
        print(
            f"quality_over_loss_trial_seconds = {seconds_ratio:.2f} (training steps "
            f"{result['quality_over_loss_training_steps']:.2f}); stopped after the last step: "
            + ", ".join(f"{arm} {a['stopped_after_last_step']}" for arm, a in arms.items())
        )
    _common.write_json(args.out, result)


if __name__ == "__main__":
    main()
