"""Evaluation metrics that make runs comparable.

- `classifier`: a small CNN per image dataset, trained once per (dataset, seed) and cached; its
  penultimate layer is the feature space of the image metrics.
- `image_metrics`: FID (torchmetrics), improved precision/recall, guided accuracy; the real
  images' side of FID and precision/recall once per set of real images (`RealReference`).
- `points_metrics`: sliced Wasserstein-2, energy distance and mode coverage for 2-D toy data.
- `bootstrap`: the metrics' bootstrap replicates, their intervals, paired differences.
- `grids`: PNG sample grids (one row per class) and 2-D scatter plots.
"""

from .classifier import (
    ClassifierArch,
    EvalClassifier,
    TrainedClassifier,
    classifier_accuracy,
    classifier_cache_path,
    default_cache_dir,
    load_or_train_classifier,
    train_classifier,
)
from .grids import grid_filename, make_grid_array, save_points_plot, save_sample_grid
from .image_metrics import (
    ClassifierFeatures,
    RealReference,
    evaluate_images,
    fid_in_classifier_features,
    fid_inception,
    guided_accuracy,
    image_metrics,
    precision_recall,
)
from .points_metrics import (
    MixtureTruth,
    energy_distance,
    evaluate_points,
    fraction_of_modes_hit,
    label_accuracy,
    mode_coverage_per_class,
    point_metrics,
    sliced_wasserstein,
)

__all__ = [
    "ClassifierArch",
    "ClassifierFeatures",
    "EvalClassifier",
    "MixtureTruth",
    "RealReference",
    "TrainedClassifier",
    "classifier_accuracy",
    "classifier_cache_path",
    "default_cache_dir",
    "energy_distance",
    "evaluate_images",
    "evaluate_points",
    "fid_in_classifier_features",
    "fid_inception",
    "fraction_of_modes_hit",
    "grid_filename",
    "guided_accuracy",
    "image_metrics",
    "label_accuracy",
    "load_or_train_classifier",
    "make_grid_array",
    "mode_coverage_per_class",
    "point_metrics",
    "precision_recall",
    "save_points_plot",
    "save_sample_grid",
    "sliced_wasserstein",
    "train_classifier",
]
