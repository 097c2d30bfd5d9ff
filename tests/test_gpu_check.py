"""benchmarks/gpu_check.py, smoke-run on this CPU machine as the GPU machine would run it: without
Ray, MLflow, the orchestrator, Pillow, matplotlib, scipy and scikit-learn (a meta-path finder
makes importing them fail, as it would there), so a script that imports one of them fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = {
    "environment",
    "options",
    "sync_audit",
    "fit",
    "sampling_precision",
    "guidance_cost",
    "grouping",
}
# What the GPU machine does not have: importing any of these must fail in the script.
ABSENT = ("orchestrator", "ray", "mlflow", "PIL", "matplotlib", "scipy", "sklearn")
# Runs the script as `python benchmarks/gpu_check.py ARGS` would, with those imports blocked.
# Runs the script as `python benchmarks/gpu_check.py ARGS` would, with those packages hidden from
# every import finder: importing one raises ModuleNotFoundError and importlib.util.find_spec
# returns None for it (what torch and torchmetrics probe with), as where it is not installed.
RUNNER = f"""
import importlib.abc, runpy, sys
ABSENT = {ABSENT!r}

class Hidden(importlib.abc.MetaPathFinder):
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
CUDA_ONLY = {
    ("environment", "cuda_usable"),
    ("environment", "bf16_supported"),
    ("sync_audit", "sync_training_step"),
    ("sync_audit", "sync_sampling_steps"),
    ("fit", "precision_bf16_mixed"),
    ("fit", "weights_on_cuda"),
    ("fit", "ema_on_cuda"),
    ("fit", "p5_images_per_s"),
    ("guidance_cost", "p3_guided_over_unguided"),
}


def run_gpu_check(tmp_path: Path, *args: str, timeout: int = 300):
    out = tmp_path / "x.json"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, out


def test_the_runner_blocks_what_the_gpu_machine_lacks(tmp_path):
    """The guard is real: a script that imports mlflow fails under it."""
    script = tmp_path / "imports_mlflow.py"
    script.write_text("import mlflow\n")
    runner = RUNNER.replace(repr(str(SCRIPT)), repr(str(script)))
    proc = subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "No module named 'mlflow'" in proc.stderr, proc.stderr
    probe = RUNNER.replace(repr(str(SCRIPT)), repr(str(tmp_path / "probe.py")))
    (tmp_path / "probe.py").write_text(
        "import importlib.util\nassert importlib.util.find_spec('scipy') is None\nimport torch\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_smoke_run_on_the_cpu_passes_its_checks_and_skips_the_cuda_ones(tmp_path):
    proc, out = run_gpu_check(tmp_path, "--smoke")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert set(report["sections"]) == SECTIONS
    assert report["cuda"] is False and report["sizes"] == "smoke"
    for name, section in report["sections"].items():
        assert section["seconds"] is not None, name
        if name == "sync_audit":
            assert section["status"] == "skipped" and "no CUDA" in section["note"]
        else:
            assert section["status"] == "ok", (name, section)

    checks = {(c["section"], c["name"]): c for c in report["checks"]}
    failed = [k for k, c in checks.items() if c["status"] == "fail"]
    assert not failed, [checks[k] for k in failed]
    for key in CUDA_ONLY:
        assert checks[key]["status"] == "skipped", checks[key]
        assert "no CUDA" in checks[key]["detail"], checks[key]
    # what the CPU can check, it checked
    for key in [
        ("options", "all_combinations_finite_and_shaped"),
        ("options", "guidance_weight_changes_samples"),
        ("options", "cpu_device_ddim_agreement"),
        ("fit", "completed_all_steps"),
        ("fit", "validation_ran"),
        ("fit", "no_recompile_fallback"),
        ("fit", "weights_and_ema_on_module_device"),
        ("sampling_precision", "both_precisions_finite"),
        ("grouping", "grouped_samples_finite"),
        ("environment", "no_orchestrator_ray_mlflow_imports"),
        ("environment", "nothing_the_gpu_machine_lacks"),
    ]:
        assert checks[key]["status"] == "pass", checks[key]
    assert report["summary"]["ok"] is True

    fit = report["sections"]["fit"]["figures"]
    assert fit["images_per_s"] > 0 and fit["flops_per_image"] > 0
    assert fit["mfu"] is None  # no peak for a CPU
    assert report["sections"]["options"]["figures"]["combinations"] >= 58
    assert set(report["sections"]["guidance_cost"]["figures"]["per_batch"]) == {"2", "4"}
    assert not set(ABSENT) & set(report["modules"]), report["modules"]
    assert "lightning_modules" in report["modules"]
    assert "gpu_check on CPU" in proc.stdout  # the table


def gpu_check_sh(out: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh as the GPU machine runs it, smoke-sized, no time for heavy sections."""
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--budget-s", "0", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_check_sh_with_no_budget_skips_the_heavy_sections(tmp_path):
    """The wrapper (omegaconf is importable here, so it installs nothing) passes its arguments
    on and writes to $OUT; a budget of 0 s skips every heavy section with a note."""
    proc = gpu_check_sh(tmp_path, "--no-require-cuda")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert sections["environment"]["status"] == "ok"
    for name in SECTIONS - {"environment"}:
        assert sections[name]["status"] == "skipped", (name, sections[name])
        assert "budget" in sections[name]["note"], sections[name]
    assert set(report["summary"]["skipped_for_budget"]) == SECTIONS - {"environment"}
    assert (tmp_path / "gpu_check.log").is_file()


def test_gpu_check_sh_fails_when_cuda_is_required_but_unusable(tmp_path):
    proc = gpu_check_sh(tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    cuda = [c for c in report["checks"] if c["name"] == "cuda_usable"]
    assert cuda and cuda[0]["status"] == "fail" and "--require-cuda" in cuda[0]["detail"]
