"""Where a trial's time goes: exclusive wall-clock seconds per phase, reported with its result.

A trial times its phases (building the experiment, training, checkpoints, evaluation, MLflow
calls) and reports them to Tune with its final result as ``time/<phase>_s``; they reach the
sweep's summary.json, and the benchmarks read them from there instead of patching the trial.
Nested phases count once, for the innermost (an MLflow call during evaluation is ``mlflow``);
only the trial's own thread is timed (the metric writer's background writes run beside it).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PHASES = ("build", "fit", "periodic_eval", "checkpoint", "evaluate", "mlflow")


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []  # time spent in timed phases nested in each open one
        self._thread = threading.get_ident()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if threading.get_ident() != self._thread:
            yield
            return
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[phase] += elapsed - self._children.pop()
            if self._children:
                self._children[-1] += elapsed

    def move(self, seconds: float, source: str, target: str) -> None:
        """Count ``seconds`` of ``source`` as ``target`` (time a phase spent on something its
        own code measured: the periodic evaluation inside ``fit``)."""
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def report(self) -> dict[str, float]:
        return {f"time/{phase}_s": self.seconds.get(phase, 0.0) for phase in PHASES}


class TimedClient:
    """An MlflowClient whose calls (from the timer's thread) count as the ``mlflow`` phase."""

    def __init__(self, client: Any, timer: PhaseTimer):
        self._client, self._timer = client, timer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            with self._timer("mlflow"):
                return attr(*args, **kwargs)

        return timed
