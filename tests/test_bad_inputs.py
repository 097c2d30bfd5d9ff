"""Bad input, caught before anything starts: one line, exit status 2, the file, the key path as
the user wrote it, its position, what was expected; nothing recorded.

The sweep-file corpus lives in tests/bad_inputs/: one file per case, and in expected.tsv the
exact line each must print (``{file}`` stands for its path). A ``# args:`` comment in a case
adds command-line arguments.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from orchestrator.cli import main

CASES = Path(__file__).parent / "bad_inputs"
EXPECTED = dict(
    line.split("\t", 1) for line in (CASES / "expected.tsv").read_text().splitlines() if line
)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_every_case_has_its_line_and_every_line_its_case():
    assert set(EXPECTED) == {p.name for p in CASES.glob("*.yaml")}
    assert len(EXPECTED) >= 20


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_sweep_file_is_one_line_naming_where_and_what(case, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `run` would record here: it must not
    path = CASES / case
    match = re.search(rb"^# args: (.*)$", path.read_bytes(), re.M)
    args = match.group(1).decode().split() if match else []
    code, out, err = cli(command, str(path), *args)
    assert code == 2
    assert err == "ddpm-sweep: error: " + EXPECTED[case].replace("{file}", str(path)) + "\n"
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no MLflow database, no Tune directory


def test_name_given_on_the_command_line_is_checked_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
    code, _, err = cli("run", str(sweep), "--name", "../../x")
    assert code == 2
    assert err.startswith(f"ddpm-sweep: error: {sweep} (override --name ../../x): name = ")
    assert list(tmp_path.iterdir()) == []


def test_an_override_of_a_dotted_search_axis_replaces_that_axis():
    from orchestrator.plan import build_plan

    sweep = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
    plan = build_plan(sweep, ["search.diffusion.schedule=[sigmoid]", "search.sample.guidance=[2]"])
    assert [t.params for t in plan.trainings] == [{"diffusion.schedule": "sigmoid"}]
    assert {c.spec.guidance for c in plan.cells} == {2.0}


@pytest.mark.slow
def test_more_gpus_per_trial_than_the_cluster_has_is_refused_before_anything_is_recorded(
    tmp_path,
):
    sweep = Path(__file__).parents[1] / "sweeps" / "mixture_quick.yaml"
    out = run_cli("run", str(sweep), "tune.gpus_per_trial=1", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ddpm-sweep: error: {sweep} (override tune.gpus_per_trial=1): ")
    assert "tune.gpus_per_trial = 1 is more than a trial can get" in line
    assert "no node of the 1-node Ray cluster offers GPU" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ddpm_sweep_runs").exists()


# -- the single-run commands -----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lightning_modules.config import load_config
    from lightning_modules.train import fit

    cfg = load_config(
        None,
        [
            "data.name=gaussian_mixture",
            "data.n_train=256",
            "data.n_val=64",
            "network.name=mlp",
            "network.hidden_dim=16",
            "network.num_blocks=1",
            "diffusion.timesteps=10",
            "sample.steps=[5]",
            "train.max_steps=2",
            "train.val_every_n_steps=2",
            "train.bpd_subset=0",
        ],
    )
    result = fit(cfg, tmp_path_factory.mktemp("ckpt"), enable_progress_bar=False)
    return result.checkpoint


def test_sample_refuses_an_unknown_setting(checkpoint, tmp_path):
    code, _, err = cli("sample", str(checkpoint), "--out", str(tmp_path / "s"), "samplr=ddim")
    assert code == 2
    assert err == (
        "ddpm-sweep: error: ddpm-sweep sample: samplr: unknown config key; "
        "did you mean 'sampler'?\n"
    )
    assert not (tmp_path / "s").exists()


def test_sample_refuses_learned_range_on_a_fixed_variance_model(checkpoint, tmp_path):
    code, _, err = cli(
        "sample", str(checkpoint), "--out", str(tmp_path / "s"), "--variance", "learned_range"
    )
    assert code == 2 and "needs a model trained with diffusion.variance = 'learned_range'" in err


def test_sample_out_that_is_a_file_is_a_clear_error(checkpoint, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("mine")
    code, _, err = cli("sample", str(checkpoint), "--out", str(target))
    assert code == 2
    assert (
        err
        == f"ddpm-sweep: error: --out {target}: is a file; expected a directory (new or existing)\n"
    )
    assert target.read_text() == "mine"


def test_truncated_and_foreign_checkpoints_name_the_file_and_the_problem(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(Path(checkpoint).read_bytes()[:2000])
    code, _, err = cli("sample", str(truncated), "--out", str(tmp_path / "a"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"ddpm-sweep: error: {truncated}: not a readable checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    code, _, err = cli("sample", str(foreign), "--out", str(tmp_path / "b"))
    assert code == 2
    assert err.startswith(f"ddpm-sweep: error: {foreign}: not a ddpm-sweep checkpoint")
    code, _, err = cli("sample", str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "c"))
    assert code == 2 and "no such checkpoint file" in err


def test_report_on_a_missing_database_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by in-process MLflow use
    code, _, err = cli("report", "quickstart")
    assert code == 2
    assert err.startswith(f"ddpm-sweep: error: sqlite:///{tmp_path}/mlflow.db: no MLflow database")
    assert list(tmp_path.iterdir()) == []
