"""Evaluation on held-out clients: what meta-learning is for.

For each held-out client: the loss (and accuracy, for classification) of the global model on
the client's query split before adaptation, then after ``adapt_steps`` SGD steps with
``adapt_lr`` on its support split (the test-time protocol of Finn et al. 2017, Sec. 5, and of
FedMeta, Chen et al. 2018). Summaries report mean, p10, p50 and p90 across clients.

A Meta-SGD model (Li et al. 2017) is the vector [theta ; alpha]: its held-out clients adapt with the
learned per-parameter rates, theta <- theta - alpha o grad L_support(theta) (Li et al. 2017, Eq. 1),
instead of ``adapt_lr``; ``adapt_steps`` still counts the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from simulator.algorithms.record import Algorithm, LossFn, split_vector
from simulator.algorithms.registry import resolve
from simulator.algorithms.steps import batch_plan, inner_loop
from simulator.config.schema import AlgorithmConfig, EvalConfig
from simulator.data.base import ClientShard, Split
from simulator.params import load_flat, num_parameters, unflatten


@dataclass(frozen=True)
class ClientEval:
    loss_pre: float
    loss_post: float
    metric_pre: float   # accuracy; NaN for regression
    metric_post: float


def _score(model: nn.Module, data: Split, loss: LossFn, task: str) -> tuple[float, float]:
    with torch.no_grad():
        out = model(data.x)
        acc = float((out.argmax(dim=1) == data.y).float().mean()) if task == "classification" else math.nan
        return float(loss(out, data.y)), acc


def evaluate_client(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: EvalConfig,
                    algo: AlgorithmConfig, rng: np.random.Generator, loss: LossFn, task: str,
                    algorithm: Algorithm | None = None) -> ClientEval:
    """Score the server vector ``theta`` on the client's query split before and after adapting on its support
    (``algorithm``: the record of ``algo``, resolved when not given)."""
    params, alpha = split_vector(algorithm or resolve(algo), theta, num_parameters(model))
    load_flat(model, params)
    loss_pre, metric_pre = _score(model, shard.query, loss, task)
    plan = batch_plan(rng, len(shard.support), algo.batch_size, cfg.adapt_steps)
    inner_loop(model, shard.support, plan, cfg.adapt_lr if alpha is None else unflatten(model, alpha), loss)
    loss_post, metric_post = _score(model, shard.query, loss, task)
    return ClientEval(loss_pre, loss_post, metric_pre, metric_post)


STATS = ("mean", "p10", "p50", "p90")


def summarize(values: np.ndarray) -> dict[str, float]:
    """mean, p10, p50, p90 of per-client values (NaN where there are none or all are NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(np.isnan(v)):
        return dict.fromkeys(STATS, math.nan)
    p10, p50, p90 = np.nanpercentile(v, [10, 50, 90])
    return {"mean": float(np.nanmean(v)), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
