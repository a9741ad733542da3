"""The demo: five 2-D clusters made in code, fitted by gradient descent, drawn with ellipses.

As in the original GMMPytorch ``demo.py``: draw points from five Gaussian clusters, fit a
mixture with :func:`puregmm.fit` by gradient descent (``method="gd"``, the original GMMPytorch
way; EM is ``fit``'s default and one keyword away), print the final loss
and save a picture of the data with each component's 1-, 2- and 3-sigma ellipses.
``python -m puregmm demo [--family F] [--components K] [--out PATH]`` runs it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from puregmm.fit import FitResult, fit

# Five clusters: centre, standard deviations along the rotated axes, rotation (radians).
CLUSTERS = (
    ((-5.0, -3.5), (1.5, 0.5), 0.3),
    ((-4.5, 4.0), (1.2, 0.6), -0.8),
    ((0.5, 0.0), (1.0, 0.8), 1.2),
    ((5.0, 4.5), (1.6, 0.4), 0.0),
    ((5.5, -4.0), (0.9, 0.9), -0.4),
)


def demo_data(n_per_cluster: int = 300, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """[5 · n_per_cluster, 2] points, cluster by cluster (the same for the same seed)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for centre, sd, angle in CLUSTERS:
        c, s = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        z = torch.randn(n_per_cluster, 2, generator=g, dtype=torch.float64) * torch.tensor(sd, dtype=torch.float64)
        parts.append(torch.tensor(centre, dtype=torch.float64) + z @ rot.mT)
    return torch.cat(parts).to(dtype)


def run_demo(
    family: str = "full",
    n_components: int = 5,
    out: str | os.PathLike[str] | None = "demo.png",
    *,
    seed: int = 0,
    progress: bool = False,
    save_data: str | os.PathLike[str] | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    """Fit the demo data, print the final loss, save the picture to ``out`` (None: no picture).

    ``save_data`` also writes the points (``.csv`` with a header, or ``.npy``), e.g. to try
    ``puregmm fit`` on them.
    """
    x = demo_data(seed=seed)
    if save_data is not None:
        write_points(x, save_data)
    fit_kwargs.setdefault("method", "gd")  # the demo's story: gradient descent with resets
    result = fit(x, n_components, family, key=seed, progress=progress, **fit_kwargs)
    print(
        f"demo: {x.shape[0]} points, family={family}, K={n_components}: final loss {float(result.loss):.6f} "
        f"after {result.n_steps} steps (converged={result.converged}, resets={result.n_resets})"
    )
    if out is not None:
        from puregmm.plot import fit_figure, save_figure

        save_figure(fit_figure(result.params, x, result.history), out)
        print(f"demo: wrote {os.fspath(out)}")
    return result


def write_points(x: Tensor, path: str | os.PathLike[str]) -> None:
    """Write points [N, D] as ``.npy`` or as ``.csv`` with a header ``x1,x2,...``."""
    import numpy as np

    suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
    if suffix == "npy":
        np.save(path, x.numpy())
    elif suffix == "csv":
        header = ",".join(f"x{i + 1}" for i in range(x.shape[1]))
        np.savetxt(path, x.numpy(), delimiter=",", header=header, comments="", fmt="%.9g")
    else:
        raise ValueError(f"save_data must end in .csv or .npy; got {os.fspath(path)!r}")
    print(f"demo: wrote the points to {os.fspath(path)}")
