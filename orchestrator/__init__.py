"""The ``ddpm-sweep`` command: sweep files, the train-once/sample-many planner, Ray Tune, MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ddpm-sweep")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
