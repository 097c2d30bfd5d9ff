import os
import sys

import pytest
import torch

# The suite runs on small CPU machines next to other processes (Ray workers, MLflow servers);
# one intra-op thread per process avoids oversubscription, which slows tiny ops by 50x.
torch.set_num_threads(int(os.environ.get("DDPM_SWEEP_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """MLflow used in-process (Lightning's logger, `mlflow.set_tracking_uri`) exports
    MLFLOW_TRACKING_URI; a later test's `ddpm-sweep` subprocess would inherit it and record in
    that test's database instead of its own. `set_tracking_uri` also pins the URI in MLflow's
    module, over the variable. Each test leaves both as it found them."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    pinned = _pinned_tracking_uri()
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = pinned


def _pinned_tracking_uri():
    if "mlflow" not in sys.modules:
        return None
    from mlflow.tracking._tracking_service import utils

    return getattr(utils, "_tracking_uri", None)


@pytest.fixture(scope="session")
def digits():
    """sklearn digits as (x in [-1, 1] (N, 1, 8, 8), y), split into two stratified halves."""
    from eval_helpers import digit_halves

    return digit_halves()


@pytest.fixture(scope="session")
def trained(digits):
    """The classifier the image-metric tests use: trained once on half A of digits."""
    from eval_helpers import classifier_on

    return classifier_on(digits)
