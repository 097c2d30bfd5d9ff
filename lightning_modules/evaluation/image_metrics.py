"""Image sample quality in the evaluation classifier's feature space.

FID comes from torchmetrics with the classifier's penultimate layer as its feature extractor;
precision/recall follow Kynkäänniemi et al. (2019); guided accuracy checks that classifier-free
guidance produced the class that was asked for. All images are float (N, C, H, W) in [-1, 1].
The real images' side of FID and precision/recall (`RealReference`) can be computed once and
shared by every sample set measured against the same images.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .bootstrap import Resamples, fid_replicates, weighted_mean
from .classifier import EvalClassifier, batched_apply, model_device

logger = logging.getLogger(__name__)


class ClassifierFeatures(nn.Module):
    """Adapter that lets torchmetrics' FID use `EvalClassifier.features` as its extractor.

    torchmetrics reads `num_features` instead of probing with a dummy image, and passes a custom
    extractor's input through untouched, so images stay in [-1, 1]. Features are returned in
    float64 so the metric's covariance and eigenvalue computation run in double precision.
    """

    def __init__(self, classifier: EvalClassifier, batch_size: int = 512) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        # Metric.train()/eval() propagate here; the extractor must stay frozen.
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        device = model_device(self.classifier)
        return batched_apply(self.classifier.features, x.float(), self.batch_size, device).double()


def fid_in_classifier_features(
    samples: Tensor, real_x: Tensor, classifier: EvalClassifier, batch_size: int = 512
) -> float:
    """Fréchet distance between Gaussians fitted to classifier features of the two sets."""
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier, batch_size))
    metric = metric.to(model_device(classifier))  # its feature sums live with the features
    for chunk in real_x.split(batch_size):
        metric.update(chunk, real=True)
    for chunk in samples.split(batch_size):
        metric.update(chunk, real=False)
    # Tiny negative values are eigenvalue round-off on (near-)identical sets: a distance is >= 0.
    return max(metric.compute().item(), 0.0)


def _to_inception_uint8(x: Tensor) -> Tensor:
    # Inception wants 3-channel uint8 images; grey images are repeated across channels.
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def fid_inception(
    samples: Tensor, real_x: Tensor, weights_path: str | Path, batch_size: int = 64
) -> float:
    """Standard Inception-v3 FID from locally supplied weights (never downloaded).

    Needs the `torch-fidelity` package; it is optional because it pulls in torchvision.
    """
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            f"inception_weights_path={str(weights_path)!r} asks for Inception FID, which needs "
            "the optional package torch-fidelity: `pip install torch-fidelity` "
            "(or `pip install torchmetrics[image]`); leave inception_weights_path unset to use "
            "only the classifier-feature FID"
        )
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"inception_weights_path={str(weights_path)!r} is not a file")
    metric = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(weights_path)
    )
    for chunk in real_x.split(batch_size):
        metric.update(_to_inception_uint8(chunk), real=True)
    for chunk in samples.split(batch_size):
        metric.update(_to_inception_uint8(chunk), real=False)
    return metric.compute().item()


def guided_hits(
    samples: Tensor, requested_labels: Tensor, classifier: EvalClassifier, batch_size: int = 512
) -> Tensor:
    """(N,) bool: whether the classifier assigns each sample the label that was requested."""
    classifier.eval()
    device = model_device(classifier)
    pred = batched_apply(classifier, samples.float(), batch_size, device).argmax(dim=1)
    return pred == requested_labels.to(pred.device)


def guided_accuracy(
    samples: Tensor, requested_labels: Tensor, classifier: EvalClassifier, batch_size: int = 512
) -> float:
    """Fraction of samples the classifier assigns to the label that was requested."""
    return guided_hits(samples, requested_labels, classifier, batch_size).double().mean().item()


def kth_nn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour within the same set."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(features)}")
    radii = []
    for chunk in features.split(chunk_size):
        dist = torch.cdist(chunk, features)
        # k + 1 because each point is its own nearest neighbour at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def in_manifold(queries: Tensor, support: Tensor, radii: Tensor, chunk_size: int = 1024) -> Tensor:
    """(len(queries),) bool: whether each query lies in the union of balls B(support_i, radii_i)."""
    inside = [
        (torch.cdist(chunk, support) <= radii[None, :]).any(dim=1)
        for chunk in queries.split(chunk_size)
    ]
    return torch.cat(inside)


def fraction_in_manifold(
    queries: Tensor, support: Tensor, radii: Tensor, chunk_size: int = 1024
) -> float:
    """Fraction of queries inside the union of balls B(support_i, radii_i)."""
    return in_manifold(queries, support, radii, chunk_size).double().mean().item()


def manifold_indicators(
    fake_features: Tensor,
    real_features: Tensor,
    k: int = 3,
    chunk_size: int = 1024,
    real_radii: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(each generated sample inside the real manifold, each real sample inside the generated
    manifold): precision and recall are their means (Kynkäänniemi et al. 2019)."""
    fake, real = fake_features.double(), real_features.double()
    if real_radii is None:
        real_radii = kth_nn_radii(real, k, chunk_size)
    fake_radii = kth_nn_radii(fake, k, chunk_size)
    return in_manifold(fake, real, real_radii, chunk_size), in_manifold(
        real, fake, fake_radii, chunk_size
    )


def precision_recall(
    fake_features: Tensor,
    real_features: Tensor,
    k: int = 3,
    chunk_size: int = 1024,
    real_radii: Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: share of generated samples inside the real manifold (quality).
    Recall: share of real samples inside the generated manifold (coverage).
    `real_radii` are the real features' `kth_nn_radii` (in float64) when already computed.
    """
    fake_in, real_in = manifold_indicators(fake_features, real_features, k, chunk_size, real_radii)
    return fake_in.double().mean().item(), real_in.double().mean().item()


class _PrecomputedFeatures(nn.Module):
    """FID "extractor" for features computed beforehand: hands them on in float64, as
    `ClassifierFeatures` does, so the metric's sums are those it would get from the images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


@dataclass
class RealReference:
    """The real images' side of the image metrics: their classifier features, each one's k-th
    nearest-neighbour radius (the real manifold of precision) and FID's real statistics.

    Computed once (`from_images`) and shared by every sample set measured against the same
    images, it gives the numbers that measuring each set from the images gives, without running
    the real images through the classifier again. Not for concurrent use: `fid` keeps the last
    sample set's statistics in `fid_metric` until the next call resets them.
    """

    features: Tensor  # (N, feature_dim), on the classifier's device
    radii: Tensor  # (N,) float64
    k: int
    batch_size: int
    fid_metric: FrechetInceptionDistance  # real side accumulated; reset() keeps it

    @classmethod
    def from_images(
        cls, real_x: Tensor, classifier: EvalClassifier, k: int = 3, batch_size: int = 512
    ) -> RealReference:
        classifier.eval()
        features = batched_apply(
            classifier.features, real_x.float(), batch_size, model_device(classifier)
        )
        metric = FrechetInceptionDistance(
            feature=_PrecomputedFeatures(classifier.num_features), reset_real_features=False
        ).to(features.device)
        # The same chunks as `fid_in_classifier_features` feeds it: the same sums, bit for bit.
        for chunk in features.split(batch_size):
            metric.update(chunk, real=True)
        return cls(features, kth_nn_radii(features.double(), k), k, batch_size, metric)

    def fid(self, fake_features: Tensor) -> float:
        """FID of a sample set, from its classifier features."""
        self.fid_metric.reset()  # the fake side only (reset_real_features=False)
        for chunk in fake_features.split(self.batch_size):
            self.fid_metric.update(chunk, real=False)
        # Tiny negative values are eigenvalue round-off on (near-)identical sets.
        return max(self.fid_metric.compute().item(), 0.0)

    def precision_recall(self, fake_features: Tensor) -> tuple[float, float]:
        """Precision and recall of a sample set, from its classifier features."""
        return precision_recall(fake_features, self.features, self.k, real_radii=self.radii)

    def manifold_indicators(self, fake_features: Tensor) -> tuple[Tensor, Tensor]:
        """See :func:`manifold_indicators`; precision and recall are their means."""
        return manifold_indicators(fake_features, self.features, self.k, real_radii=self.radii)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """The real features' mean and covariance in float64 (FID's real side)."""
        f = self.features.double()
        return f.mean(dim=0), torch.cov(f.T)


def evaluate_images(
    samples: Tensor, requested_labels: Tensor | None, real_x: Tensor, classifier, **options
) -> dict[str, float]:
    """All image metrics of one sample set against real data.

    Keys: `fid`, `precision`, `recall` (classifier feature space), `guided_accuracy` when
    `requested_labels` is given, and `fid_inception` when `inception_weights_path` is given.
    ``options``: :func:`image_metrics`'s (`k`, `batch_size`, `inception_weights_path`, and
    `reference`, `RealReference.from_images(real_x, classifier, k, batch_size)` computed
    beforehand by a caller that measures several sample sets against the same `real_x`).
    """
    return image_metrics(samples, requested_labels, real_x, classifier, **options)[0]


def image_metrics(
    samples: Tensor,
    requested_labels: Tensor | None,
    real_x: Tensor,
    classifier: EvalClassifier,
    k: int = 3,
    batch_size: int = 512,
    inception_weights_path: str | Path | None = None,
    reference: RealReference | None = None,
    resamples: Resamples | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """(metrics as :func:`evaluate_images`, their bootstrap replicates): with ``resamples``,
    B replicates of `fid`, `precision`, `recall` and `guided_accuracy` (not of `fid_inception`)
    from the features and indicators the metrics are computed from (lightning_modules/
    evaluation/bootstrap.py)."""
    classifier.eval()
    if reference is None:
        reference = RealReference.from_images(real_x, classifier, k, batch_size)
    elif reference.k != k:
        raise ValueError(f"the reference's radii are for k={reference.k}, not k={k}")
    device = model_device(classifier)
    fake_features = batched_apply(classifier.features, samples.float(), batch_size, device)
    fake_in, real_in = reference.manifold_indicators(fake_features)
    metrics = {
        "fid": reference.fid(fake_features),
        "precision": fake_in.double().mean().item(),
        "recall": real_in.double().mean().item(),
    }
    correct = None
    if requested_labels is not None:
        correct = guided_hits(samples, requested_labels, classifier, batch_size)
        metrics["guided_accuracy"] = correct.double().mean().item()
    if inception_weights_path is not None:
        metrics["fid_inception"] = fid_inception(samples, real_x, inception_weights_path)
    logger.debug("image metrics: %s", metrics)
    if resamples is None:
        return metrics, {}
    replicates = {
        "fid": fid_replicates(fake_features, resamples.samples, *reference.statistics()),
        "precision": weighted_mean(fake_in.double(), resamples.samples),
        "recall": weighted_mean(real_in.double(), resamples.real(len(real_in))),
    }
    if correct is not None:
        replicates["guided_accuracy"] = weighted_mean(correct.double(), resamples.samples)
    return metrics, {key: value.cpu() for key, value in replicates.items()}
