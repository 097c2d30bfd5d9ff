"""ddpm-sweep's model side: the diffusion math, denoiser networks, data modules, evaluation and
the Lightning module. Importing it needs torch (and Lightning for the module) but never Ray or
MLflow, so it trains and samples on machines that have neither.

The diffusion math is re-exported here; see :mod:`lightning_modules.diffusion` for the
timestep-indexing and guidance conventions.
"""

from .diffusion import *  # noqa: F403
from .diffusion import __all__ as _diffusion_all

__all__ = list(_diffusion_all)
