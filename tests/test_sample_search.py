"""Searching the sampling-time space per checkpoint (orchestrator/sample_search.py): chunked,
class-balanced, paired multi-fidelity evaluation; the study's cells as MLflow runs, stopped ones
saying so; resume from MLflow without sampling a finished cell again; the plan."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
from sweep_helpers import eval_runs, plan_and_fit, setup_trial

from lightning_modules.evaluate import (
    eval_chunks,
    eval_labels,
    evaluate_chunked,
    evaluate_group,
    prepare_context,
)
from orchestrator import sample_search
from orchestrator.sample_search import CellStudy
from orchestrator.tracking import NUMBER_TAG, STOPPED_TAG, STUDY_TAG, VALUES_TAG
from orchestrator.trial import CELL_TAG, EvalLabels, evaluate_cells

SWEEP = """
name: searched
base:
  data: {name: gaussian_mixture, batch_size: 256, n_train: 2048, n_val: 128}
  network: {name: mlp, hidden_dim: 64, num_blocks: 2}
  diffusion: {timesteps: 100, prediction: v}
  train: {max_steps: 150, lr: 3.0e-3, p_uncond: 0.2, val_every_n_steps: 150, bpd_subset: 0}
  sample: {sampler: ddim}
  eval: {num_samples: 40, floor_draws: 0}
search:
  sample.guidance: {uniform: [0, 8]}
  sample.eta: {uniform: [0, 1]}
  sample.steps: {randint: [1, 21]}
  sample.variance: [fixed_small, fixed_large]
sample_search: {cells: 5, chunks: 4, seed: 3}
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return plan_and_fit(tmp_path_factory.mktemp("fit"), SWEEP)


def counting(monkeypatch, fail_at: int | None = None):
    """Record the specs evaluate_chunked draws; raise inside the cell of index ``fail_at`` (its
    run open, nothing measured), as a killed process would leave it."""
    sampled = []
    real = sample_search.evaluate_chunked

    def evaluate(module, datamodule, spec, *args, **kwargs):
        sampled.append(spec)
        if fail_at is not None and len(sampled) == fail_at + 1:
            raise KeyboardInterrupt("killed mid-cell")
        return real(module, datamodule, spec, *args, **kwargs)

    monkeypatch.setattr(sample_search, "evaluate_chunked", evaluate)
    return sampled


def test_chunks_hold_every_class_and_cover_every_position_once():
    labels = eval_labels(8, 80, 10)  # class-major: 10 of class 0, then 10 of class 1, ...
    chunks = eval_chunks(labels, len(labels), 4)
    assert sorted(torch.cat(chunks).tolist()) == list(range(80))
    for chunk in chunks:
        counts = torch.bincount(labels[chunk], minlength=8)
        assert counts.min() >= 2 and counts.max() - counts.min() == 0  # 2 or 3 each, all alike
    done = torch.cat(chunks[:2]).sort().values  # the samples after two chunks: balanced
    assert torch.bincount(labels[done]).tolist() == [5] * 8
    assert [c.tolist() for c in eval_chunks(None, 10, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_a_cell_drawn_to_the_end_in_chunks_is_the_cell_drawn_whole(fitted, tmp_path):
    plan, cfg, result = fitted
    spec = plan.cells[0].spec
    ctx = prepare_context(result.datamodule, cfg.eval)
    seen = []

    def keep_going(n, metrics, replicates):
        seen.append((n, metrics["sliced_wasserstein"], metrics["sliced_wasserstein_ci_low"]))
        return False

    chunked = evaluate_chunked(
        result.module, result.datamodule, spec, cfg.eval, tmp_path, chunks=4,
        on_chunk=keep_going, context=ctx,
    )  # fmt: skip
    (whole,) = evaluate_group(
        result.module, result.datamodule, [spec], cfg.eval, tmp_path / "w", chunks=4, context=ctx
    )
    assert [n for n, *_ in seen] == [16, 40, 56]  # after each chunk but the last
    assert all(low < value for _, value, low in seen)  # partial values come with intervals
    assert chunked.samples == whole.samples == 80 and not chunked.stopped
    for key, value in whole.metrics.items():
        assert chunked.metrics[key] == pytest.approx(value), key
    # ... and stopped after the second chunk, a cell is measured on the samples it reached,
    # the very samples the whole cell drew there (the same noise, chunk for chunk).
    stopped = evaluate_chunked(
        result.module, result.datamodule, spec, cfg.eval, tmp_path / "s", chunks=4,
        on_chunk=lambda n, m, r: n >= 40, context=ctx,
    )  # fmt: skip
    assert stopped.stopped and stopped.samples == 40
    assert stopped.metrics["sliced_wasserstein"] == pytest.approx(seen[1][1])


def test_cells_of_different_step_counts_start_every_chunk_from_the_same_noise(fitted):
    """Each batch's noise comes from (seed, batch) alone: a cell that took more steps in chunk 1
    has not moved chunk 2's starting noise. With DDIM at eta = 0 a sample is a function of its
    starting noise, so 10 and 20 steps give nearly the same samples, position for position, in
    every chunk (drawn on from one generator, chunk 2 on had correlated 0.2)."""
    plan, cfg, result = fitted
    labels = eval_labels(8, 80, 10)
    chunks = eval_chunks(labels, len(labels), 4)
    base = plan.cells[0].spec
    specs = [replace(base, guidance=1.0, eta=0.0, steps=k) for k in (10, 20)]
    x10, x20 = (result.module.sample_many(labels, [spec], chunks=chunks)[0] for spec in specs)
    for chunk in chunks:
        a, b = x10[chunk].flatten(), x20[chunk].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_paired_pruner_stops_a_cell_clearly_worse_than_the_best_at_the_same_chunk(fitted):
    plan, *_ = fitted
    study = CellStudy(plan.search, plan.cells[0], seed=0)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, generator=gen, dtype=torch.float64)
    trial, best = study.ask()
    decide = study.on_chunk(trial, best, 0.95)
    assert not decide(16, {"sliced_wasserstein": 1.0}, {"sliced_wasserstein": 1.0 + noise})
    best.value = 0.9
    study.tell(trial, best)
    # Another cell, at the same chunk: its replicates move with the best's (paired). Worse by
    # 0.05 with a paired spread of 0.01: stopped; better, or worse within the noise: not.
    for shift, spread, stops in ((0.05, 0.01, True), (-0.05, 0.01, False), (0.05, 1.0, False)):
        trial, cell = study.ask()
        decide = study.on_chunk(trial, cell, 0.95)
        jitter = spread * torch.randn(200, generator=gen, dtype=torch.float64)
        reps = {"sliced_wasserstein": 1.0 + shift + noise + jitter}
        assert decide(16, {"sliced_wasserstein": 1.0 + shift}, reps) is stops
        assert ("clearly worse than search #0 at 16 samples" in cell.stopped) is stops
        cell.value = 1.0
        study.tell(trial, cell)


def test_each_study_cell_is_a_run_and_stopped_cells_say_so(fitted, tmp_path):
    plan, cfg, result = fitted
    client, ctx, train_run = setup_trial(tmp_path, plan, "searched")
    summary = evaluate_cells(
        client, ctx, plan.cells, cfg, result, tmp_path / "a", train_run, EvalLabels("t", {})
    )
    runs = eval_runs(client, ctx)
    by_study = Counter(r.data.tags[STUDY_TAG] for r in runs)
    assert by_study == {"search fixed_small": 5, "search fixed_large": 5}
    for r in runs:
        values = json.loads(r.data.tags[VALUES_TAG])
        params = r.data.params
        assert float(params["sample.eta"]) == pytest.approx(values["eta"])
        assert int(params["sample.steps"]) == values["steps"] and 1 <= values["steps"] <= 21
        assert 0 <= float(params["sample.guidance"]) <= 8
        assert r.data.tags[CELL_TAG] == f"{r.data.tags[STUDY_TAG]} #{r.data.tags[NUMBER_TAG]}"
        assert f"search #{r.data.tags[NUMBER_TAG]}" in r.info.run_name
        m = r.data.metrics
        assert m["sliced_wasserstein_ci_low"] <= m["sliced_wasserstein"]
        assert "bootstrap.json" in [a.path for a in client.list_artifacts(r.info.run_id)]
        partial = client.get_metric_history(r.info.run_id, "sliced_wasserstein_partial")
        if r.info.status == "KILLED":  # stopped early: where, why, on how many samples
            assert "clearly worse than search #" in r.data.tags[STOPPED_TAG]
            assert m["samples"] < 80 and m["samples"] == max(p.step for p in partial)
        else:
            assert r.info.status == "FINISHED" and STOPPED_TAG not in r.data.tags
            assert m["samples"] == 80 and [p.step for p in partial] == [16, 40, 56]
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}  # some stopped, not all
    for study in by_study:
        finished = [
            r.data.metrics["sliced_wasserstein"]
            for r in runs
            if r.data.tags[STUDY_TAG] == study and r.info.status == "FINISHED"
        ]
        assert summary[f"search/sliced_wasserstein/{study}"] == min(finished)


def test_a_resumed_study_continues_without_sampling_a_finished_cell_again(
    fitted, tmp_path, monkeypatch
):
    plan, cfg, result = fitted
    labels = EvalLabels("t", {})
    # Uninterrupted, for reference: the values a seeded study proposes.
    client, ctx, train_run = setup_trial(tmp_path / "ref", plan, "searched")
    evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "r", train_run, labels)
    reference = {r.data.tags[CELL_TAG]: r.data.tags[VALUES_TAG] for r in eval_runs(client, ctx)}

    client, ctx, train_run = setup_trial(tmp_path / "cut", plan, "searched")
    sampled = counting(monkeypatch, fail_at=3)  # killed inside the first study's cell #3
    with pytest.raises(KeyboardInterrupt):
        evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "a", train_run, labels)
    first = {r.data.tags[CELL_TAG]: r for r in eval_runs(client, ctx)}
    assert len(first) == 4 and first["search fixed_small #3"].info.status == "RUNNING"
    for key in ("search fixed_small #0", "search fixed_small #1", "search fixed_small #2"):
        assert first[key].data.tags[VALUES_TAG] == reference[key]  # the same seed, the same

    sampled = counting(monkeypatch)
    evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "b", train_run, labels)
    runs = {r.data.tags[CELL_TAG]: r for r in eval_runs(client, ctx)}
    assert len(runs) == 10 and len(sampled) == 2 + 5  # #3 redone, #4, study 2; not #0-#2
    redone = runs["search fixed_small #3"]  # in its own run, with the values it had
    assert redone.info.run_id == first["search fixed_small #3"].info.run_id
    assert redone.info.status in ("FINISHED", "KILLED")
    assert json.loads(redone.data.tags[VALUES_TAG]) == json.loads(
        reference["search fixed_small #3"]
    )
    assert sampled[0].eta == pytest.approx(float(redone.data.params["sample.eta"]))
    # The second study never started before the kill: it runs as it would have.
    for n in range(5):
        key = f"search fixed_large #{n}"
        assert runs[key].data.tags[VALUES_TAG] == reference[key]

    sampled.clear()
    evaluate_cells(client, ctx, plan.cells, cfg, result, tmp_path / "c", train_run, labels)
    assert sampled == [] and len(eval_runs(client, ctx)) == 10  # every budget spent


def test_plan_shows_the_search_and_its_budget(fitted):
    plan, *_ = fitted
    assert [c.key for c in plan.cells] == ["search fixed_small", "search fixed_large"]
    assert plan.costs.cells == 10  # two studies of five
    text = plan.table()
    assert "sampling cells per training: 10 (2 studies of 5)" in text
    assert "searched: tpe (seed 3), 5 cells a study, min sliced_wasserstein" in text
    assert "sample.steps ~ randint[1, 21]" in text
