"""The one fitting loop: advance B independent runs until each converges or hits ``max_steps``.

Every fit goes through here: a single fit is B = 1, ``n_init`` restarts and
:func:`puregmm.fit_batched` stack their runs along a leading axis. ``advance`` is the method's
pure kernel (``step`` or ``em_step``) vmapped over that axis; a run that has converged is
frozen with ``torch.where`` so that it ends exactly where it would have ended alone.

The loop state is the stacked method state (params, optimiser state, step, key, resets, last
loss) plus the history; :func:`run` can save it every few steps and resume from the file, and a
resumed run is bitwise identical to an uninterrupted one (all randomness derives from the
keys and step counts inside the state, never from a global RNG).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from puregmm import _validate

CHECKPOINT_KIND = "checkpoint"
#: Convergence rules see the last this many steps of the history (enough for any window they
#: use); stacking the whole history every step would cost O(steps) per step.
HISTORY_TAIL = 256


class LoopResult(NamedTuple):
    """What :func:`run` returns (B = number of runs).

    Attributes:
        states: the stacked method states, leaves [B, ...].
        history: [T, B] loss after each step in data units; NaN once a run has stopped.
        n_steps: [B] int64 steps each run took.
        converged: [B] bool.
    """

    states: Any
    history: Tensor
    n_steps: Tensor
    converged: Tensor


def select_runs(done: Tensor, old: Any, new: Any) -> Any:
    """Leaf-wise ``where(done, old, new)`` with ``done`` [B] broadcast over each leaf."""

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(done.reshape(done.shape + (1,) * (a.dim() - 1)), a, b)

    return pytree.tree_map(pick, old, new)


def em_converged(tol: float) -> Callable[[list[Tensor]], Tensor]:
    """scikit-learn's rule: the mean log-likelihood changed by less than ``tol`` in one step.
    Rules take the history as its rows (each [B]), the latest last."""

    def rule(rows: list[Tensor]) -> Tensor:
        if len(rows) < 2:
            return torch.zeros(rows[-1].shape, dtype=torch.bool, device=rows[-1].device)
        return (rows[-1] - rows[-2]).abs() < tol

    return rule


def never_converged(tol: float) -> Callable[[list[Tensor]], Tensor]:
    """No tolerance (online EM): a run stops at ``max_steps`` or when its stream ends."""

    def rule(rows: list[Tensor]) -> Tensor:
        return torch.zeros(rows[-1].shape, dtype=torch.bool, device=rows[-1].device)

    return rule


def window_converged(tol: float, window: int) -> Callable[[list[Tensor]], Tensor]:
    """The loss varied by at most ``tol·max(1, |loss|)`` over the last ``window`` steps (for
    gradient descent, whose loss is not monotone)."""

    def rule(rows: list[Tensor]) -> Tensor:
        if len(rows) <= window:
            return torch.zeros(rows[-1].shape, dtype=torch.bool, device=rows[-1].device)
        recent = torch.stack(rows[-window - 1 :])
        spread = recent.amax(0) - recent.amin(0)
        return spread <= tol * recent[-1].abs().clamp_min(1.0)

    return rule


def run(
    states: Any,
    advance: Callable[[Any], Any | None],
    *,
    max_steps: int,
    converged: Callable[[list[Tensor]], Tensor],
    loss_offset: Tensor | None = None,
    progress: bool = False,
    checkpoint: Any = None,
    checkpoint_every: int = 100,
    resume: Any = None,
    meta: dict[str, Any] | None = None,
    advance_live: Callable[[Any, Tensor], Any] | None = None,
) -> LoopResult:
    """Advance stacked ``states`` (each with ``.loss`` and ``.step``) until every run stops.

    Args:
        states: stacked method states, leaves [B, ...].
        advance: batched pure kernel, states -> states; ``.loss`` of its output is the loss
            of the step just taken; None when its data source has ended (the loop stops).
        max_steps: total steps per run, those before a resumed checkpoint included.
        converged: the history's recent rows (each [B], data units) -> [B] bool.
        loss_offset: [B] added to ``.loss`` to get data units (gradient descent runs on
            standardised data); ``None`` for none.
        progress: a tqdm bar with the best current loss.
        checkpoint: path to save the loop state every ``checkpoint_every`` steps and at the end.
        resume: path of a checkpoint written by the same kind of fit to continue from.
        meta: JSON-able description of the fit stored in the checkpoint and checked on resume.
        advance_live: optional ``(states of the live runs, their indices [A]) -> their new
            states``; once some runs have stopped, the loop calls it instead of ``advance`` so
            stopped runs cost nothing (the kernel must treat runs independently, as ``vmap``
            does; the result is the same).
    """
    checkpoint_every = _validate.positive_int(checkpoint_every, "checkpoint_every")
    progress = _validate.flag(progress, "progress")
    meta = dict(meta or {})
    b = pytree.tree_leaves(states)[0].shape[0]
    device = pytree.tree_leaves(states)[0].device
    rows: list[Tensor] = []
    n_steps = torch.zeros(b, dtype=torch.int64, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    conv = torch.zeros(b, dtype=torch.bool, device=device)
    if resume is not None:
        states, rows, n_steps, done, conv = _load(resume, states, meta)
    offset = 0.0 if loss_offset is None else loss_offset
    bar = _progress(progress, max_steps, len(rows))
    n_done = int(done.sum())  # one sync per step; with none stopped, no selections
    while len(rows) < max_steps and n_done < b:
        if advance_live is not None and n_done:
            live = torch.nonzero(~done).flatten()  # [A]
            part = advance_live(pytree.tree_map(lambda t, i=live: t.index_select(0, i), states), live)
            new = pytree.tree_map(lambda t, p, i=live: t.index_copy(0, i, p), states, part)
        else:
            new = advance(states)
            if new is None:  # the data source ended (a stream read once)
                break
        if n_done:
            states = select_runs(done, states, new)
            rows.append(torch.where(done, torch.full_like(new.loss, float("nan")), new.loss + offset).detach())
            n_steps = n_steps + (~done).to(torch.int64)
        else:
            states = new
            rows.append((new.loss + offset).detach())
            n_steps = n_steps + 1
        now = converged(rows[-HISTORY_TAIL:]) & ~done  # the rules look at the recent steps only
        conv, done = conv | now, done | now
        n_done = int(done.sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{float(rows[-1].nan_to_num(float('inf')).min()):.6g}", running=int((~done).sum()), refresh=False
            )
        if checkpoint is not None and len(rows) % checkpoint_every == 0:
            _save(checkpoint, states, rows, n_steps, done, conv, meta)
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        _save(checkpoint, states, rows, n_steps, done, conv, meta)
    history = torch.stack(rows) if rows else torch.zeros(0, b, device=device)
    return LoopResult(states, history, n_steps, conv)


def _save(path: Any, states: Any, rows: list[Tensor], n_steps: Tensor, done: Tensor, conv: Tensor, meta: dict) -> None:
    from puregmm import io

    b = n_steps.shape[0]
    history = torch.stack(rows) if rows else torch.zeros(0, b, dtype=torch.float64)
    tree = {"states": states, "history": history, "n_steps": n_steps, "done": done, "converged": conv}
    io.save_tree(tree, path, {"fit": json.dumps(meta, sort_keys=True), "rows": str(len(rows))}, kind=CHECKPOINT_KIND)


def _load(path: Any, template: Any, meta: dict) -> tuple[Any, list[Tensor], Tensor, Tensor, Tensor]:
    from puregmm import io

    _, file_meta = io.load_tree(path, kind=CHECKPOINT_KIND)
    saved = json.loads(file_meta.get("fit", "{}"))
    differ = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"checkpoint {str(path)!r} was written by a different fit ({details})")
    b = pytree.tree_leaves(template)[0].shape[0]
    dtype = pytree.tree_leaves(template)[0].dtype
    like = {
        "states": template,
        "history": torch.zeros(int(file_meta["rows"]), b, dtype=_loss_dtype(template, dtype)),
        "n_steps": torch.zeros(b, dtype=torch.int64),
        "done": torch.zeros(b, dtype=torch.bool),
        "converged": torch.zeros(b, dtype=torch.bool),
    }
    tree, _ = io.load_tree(path, like=like, kind=CHECKPOINT_KIND)
    return tree["states"], list(tree["history"].unbind(0)), tree["n_steps"], tree["done"], tree["converged"]


def _loss_dtype(template: Any, default: torch.dtype) -> torch.dtype:
    loss = getattr(template, "loss", None)
    return loss.dtype if isinstance(loss, Tensor) else default


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step")
