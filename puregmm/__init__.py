"""puregmm: Gaussian mixture models in PyTorch as pure functions over pytrees."""

from puregmm.density import component_log_prob, log_prob, loss
from puregmm.families import FAMILIES
from puregmm.fit import ConvergenceWarning, FitResult, fit
from puregmm.init import init, kmeans_plusplus
from puregmm.optim import AdamState, Optimizer, SgdState, adam, apply_updates, cosine_decay, sgd
from puregmm.params import (
    GMMParams,
    covariances,
    from_moments,
    means,
    precision_cholesky,
    precisions,
    weights,
)
from puregmm.train import TrainState, init_state, step

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ConvergenceWarning",
    "FitResult",
    "fit",
    "init",
    "kmeans_plusplus",
    "AdamState",
    "GMMParams",
    "Optimizer",
    "SgdState",
    "TrainState",
    "__version__",
    "adam",
    "apply_updates",
    "component_log_prob",
    "cosine_decay",
    "covariances",
    "from_moments",
    "init_state",
    "log_prob",
    "loss",
    "means",
    "precision_cholesky",
    "precisions",
    "sgd",
    "step",
    "weights",
]
