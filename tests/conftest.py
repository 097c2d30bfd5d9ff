import os

import torch

# The suite runs on small CPU machines next to other processes (Ray workers, MLflow servers);
# one intra-op thread per process avoids oversubscription, which slows tiny ops by 50x.
torch.set_num_threads(int(os.environ.get("DDPM_SWEEP_TEST_THREADS", "1")))
