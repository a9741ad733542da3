"""puregmm: Gaussian mixture models in PyTorch as pure functions over pytrees."""

from puregmm import distributed, keys, stream
from puregmm.bootstrap import bootstrap
from puregmm.conditioning import condition, impute, marginal, mixture_covariance, mixture_mean, regress
from puregmm.density import component_log_prob, log_prob, loss
from puregmm.em import EMInfo, Stats, combine, em_step, m_step, sufficient_stats
from puregmm.families import FAMILIES
from puregmm.fit import ConvergenceWarning, EMState, FitResult, em_state, fit, fit_batched
from puregmm.infer import aic, bic, n_parameters, predict, predict_proba, sample, score, score_samples
from puregmm.init import init, kmeans_plusplus
from puregmm.interop import from_distribution, from_sklearn, to_distribution, to_sklearn
from puregmm.io import load, load_tree, save, save_tree
from puregmm.mdn import from_flat, param_size
from puregmm.optim import AdamState, Optimizer, SgdState, adam, apply_updates, cosine_decay, sgd
from puregmm.params import (
    GMMParams,
    covariances,
    from_moments,
    means,
    pad_components,
    precision_cholesky,
    precisions,
    weights,
)
from puregmm.plot import plot_criterion, plot_fit, plot_loss
from puregmm.select import Selection, SelectionRow, SelectionTable, format_table, select
from puregmm.train import TrainState, init_state, step

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "AdamState",
    "ConvergenceWarning",
    "EMInfo",
    "EMState",
    "FitResult",
    "GMMParams",
    "Optimizer",
    "Selection",
    "SelectionRow",
    "SelectionTable",
    "SgdState",
    "Stats",
    "TrainState",
    "__version__",
    "adam",
    "aic",
    "apply_updates",
    "bic",
    "bootstrap",
    "combine",
    "component_log_prob",
    "condition",
    "cosine_decay",
    "covariances",
    "distributed",
    "em_state",
    "em_step",
    "fit",
    "fit_batched",
    "format_table",
    "from_distribution",
    "from_flat",
    "from_moments",
    "from_sklearn",
    "impute",
    "init",
    "init_state",
    "keys",
    "kmeans_plusplus",
    "load",
    "load_tree",
    "log_prob",
    "loss",
    "m_step",
    "marginal",
    "means",
    "mixture_covariance",
    "mixture_mean",
    "n_parameters",
    "pad_components",
    "param_size",
    "plot_criterion",
    "plot_fit",
    "plot_loss",
    "precision_cholesky",
    "precisions",
    "predict",
    "predict_proba",
    "regress",
    "sample",
    "save",
    "save_tree",
    "score",
    "score_samples",
    "select",
    "sgd",
    "step",
    "stream",
    "sufficient_stats",
    "to_distribution",
    "to_sklearn",
    "weights",
]
