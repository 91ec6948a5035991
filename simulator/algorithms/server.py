"""The server side of every algorithm: its explicit state and the optimizer applied to the pseudo-gradient.

The server keeps a ``ServerState`` (model vector, step count = model version, optimizer moments) and
applies g, the pseudo-gradient of the aggregated client vectors (``record.pseudo_gradient``), with the
rule of the current ``ServerPhase``: SGD with optional momentum (FedAvgM, Hsu et al. 2019); ``adam``,
Kingma & Ba's Adam (2015, Alg. 1: bias-corrected, eps added to sqrt(v_hat)) on the pseudo-gradient; or
``fedadagrad``, ``fedadam`` and ``fedyogi`` exactly as Reddi et al. 2021 ("Adaptive Federated
Optimization", Alg. 2) print them: no bias correction, tau added to sqrt(v), v_{-1} = tau^2. An algorithm whose rule
changes mid-run (Personalized FedAvg) declares a ``schedule`` in its record; moments start afresh at the
first version of each phase, and the phase is a function of ``state.step`` alone, so a state replaced
from outside (FedAsync, a resumed checkpoint) keeps it.

Every rule is elementwise, so the driver applies a round's mean block by block (``ServerOptimizer.step_mean``,
``update_norm``): the same bits as the whole-vector rule, and no model-sized pseudo-gradient or temporary (LEAF's
CNN: 26 MB each, ``benchmarks/README.md``, "The driver's temporaries").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from simulator.algorithms.record import Algorithm, ServerPhase, phase_at, pseudo_gradient
from simulator.algorithms.registry import resolve
from simulator.config.schema import AlgorithmConfig


@dataclass(frozen=True)
class ServerState:
    """The server's model and optimizer moments; ``step`` counts applied server updates."""

    theta: torch.Tensor
    step: int = 0
    momentum: torch.Tensor | None = None   # SGD momentum buffer
    exp_avg: torch.Tensor | None = None    # first moment m of g (Adam; FedOpt's m_t of Delta_t = -g, negated)
    exp_avg_sq: torch.Tensor | None = None  # second moment v (Adam; FedOpt's v_t); None = not started


def sgd_step(state: ServerState, g: torch.Tensor, lr: float, momentum: float = 0.0) -> ServerState:
    """theta <- theta - lr * b, b = momentum * b + g (b = g when momentum is 0; FedAvgM, Hsu et al. 2019)."""
    buf = g if momentum == 0 or state.momentum is None else momentum * state.momentum + g
    step = lr * buf
    torch.sub(state.theta, step, out=step)  # theta - lr * b, written over lr * b: one model-sized vector, not two
    return ServerState(step, state.step + 1, buf if momentum else None)


def adam_step(state: ServerState, g: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> ServerState:
    """Adam (Kingma & Ba 2015, Alg. 1) on the pseudo-gradient, bias-corrected, as FedOpt's server optimizer.

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  theta <- theta - lr * m_hat / (sqrt(v_hat) + eps).
    """
    b1, b2 = betas
    t = state.step + 1
    m = (1 - b1) * g if state.exp_avg is None else b1 * state.exp_avg + (1 - b1) * g
    v = (1 - b2) * g * g if state.exp_avg_sq is None else b2 * state.exp_avg_sq + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return ServerState(state.theta - lr * m_hat / (v_hat.sqrt() + eps), t, None, m, v)


#: Reddi et al. 2021's adaptive server rules (Alg. 2), by their second-moment update
FEDOPT = ("fedadagrad", "fedadam", "fedyogi")


def fedopt_step(state: ServerState, g: torch.Tensor, rule: str, lr: float, beta1: float, beta2: float,
                tau: float) -> ServerState:
    """One server step of FedAdagrad, FedAdam or FedYogi (Reddi et al. 2021, Alg. 2), as printed.

    With Delta_t = -g the average client update (``record.pseudo_gradient``), m_{-1} = 0 and v_{-1} = tau^2
    (Alg. 2 asks for v_{-1} >= tau^2; the smallest value is taken):

        m_t = beta1 m_{t-1} + (1 - beta1) Delta_t
        v_t = v_{t-1} + Delta_t^2                                          (FedAdagrad)
        v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)    (FedYogi)
        v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2                        (FedAdam)
        x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau)

    no bias correction. ``state.exp_avg`` keeps the moment of g, i.e. -m_t (negation is exact), so
    x_{t+1} = x_t - lr exp_avg / (sqrt(v_t) + tau).
    """
    m_prev = torch.zeros_like(g) if state.exp_avg is None else state.exp_avg
    v_prev = torch.full_like(g, tau * tau) if state.exp_avg_sq is None else state.exp_avg_sq
    m = beta1 * m_prev + (1 - beta1) * g
    g2 = g * g
    if rule == "fedadagrad":
        v = v_prev + g2
    elif rule == "fedyogi":
        v = v_prev - (1 - beta2) * g2 * torch.sign(v_prev - g2)
    elif rule == "fedadam":
        v = beta2 * v_prev + (1 - beta2) * g2
    else:
        raise ValueError(f"unknown FedOpt rule {rule!r}; choose one of {', '.join(FEDOPT)}")
    return ServerState(state.theta - lr * m / (v.sqrt() + tau), state.step + 1, None, m, v)


#: values per block of ``ServerOptimizer.step_mean`` and ``update_norm``: 1 MiB of float32 per temporary
STEP_BLOCK = 2**18

Rule = Callable[[ServerState, torch.Tensor], ServerState]
#: the model-sized fields of a ``ServerState``
VECTORS = ("theta", "momentum", "exp_avg", "exp_avg_sq")


def blockwise(rule: Rule, state: ServerState, g_of: Callable[[slice], torch.Tensor], size: int,
              block: int = STEP_BLOCK) -> ServerState:
    """``rule(state, g)`` for an elementwise ``rule``, computed on ``block`` values at a time, g's block made by
    ``g_of``: each element goes through the same operations as in the whole-vector call, so the new state has the
    same bits, and the temporaries are a block's. The new tensors are allocated once, from the first block's."""
    out: dict[str, torch.Tensor | None] = {}
    step = state.step + 1
    for b in range(0, size, block):
        sl = slice(b, min(b + block, size))
        part = rule(ServerState(step=state.step, **{v: None if (t := getattr(state, v)) is None else t[sl]
                                                    for v in VECTORS}), g_of(sl))
        if not out:
            step = part.step
            out = {v: None if (t := getattr(part, v)) is None else torch.empty(size, dtype=t.dtype) for v in VECTORS}
        for v, whole in out.items():
            if whole is not None:
                whole[sl] = getattr(part, v)
    return ServerState(step=step, **out)


def update_norm(new: torch.Tensor, old: torch.Tensor, block: int = STEP_BLOCK) -> float:
    """||new - old||_2 of a server step, from the float64 sums of squares of ``block`` differences at a time (each
    difference the float32 one): no model-sized difference. Within float32's rounding of the one-shot
    ``torch.linalg.vector_norm(new - old)``, not necessarily its bits. The sums are numpy's pairwise ones, whose
    order does not depend on the process's thread count (torch's and BLAS's reductions split by threads, and the
    driver's threads differ between backends: a run must give the same bits on all)."""
    total = 0.0
    for b in range(0, new.numel(), block):
        d = (new[b:b + block] - old[b:b + block]).numpy().astype(np.float64)
        total += float(np.sum(np.square(d)))
    return math.sqrt(total)


def initial_vector(cfg: AlgorithmConfig, model_vector: torch.Tensor,
                   algorithm: Algorithm | None = None) -> torch.Tensor:
    """The server's initial vector: the model's flat parameters (plus, for algorithms that meta-learn more
    than an initialization, their extra parameters); ``algorithm`` defaults to ``cfg``'s record.

    Meta-SGD (Li et al. 2017, Sec. 3): [theta ; alpha], alpha = ``local_lr`` for every parameter."""
    if (algorithm or resolve(cfg)).learns_lr:
        return torch.cat([model_vector, torch.full_like(model_vector, cfg.local_lr)])
    return model_vector


class ServerOptimizer:
    """An algorithm's server: client weighting and the server step of the current phase applied to a
    ``ServerState``; ``state.step`` is the model version. ``algorithm`` defaults to the record ``cfg``
    names (``registry.resolve``)."""

    def __init__(self, theta: torch.Tensor, cfg: AlgorithmConfig, algorithm: Algorithm | None = None,
                 copy: bool = True) -> None:
        """``copy`` False: the state starts from ``theta`` itself, which the caller must then leave unchanged (a run
        does: its ``Prepared`` vector is only read, and no server vector is ever changed in place), saving a copy."""
        self.cfg = cfg
        self.algo = algorithm or resolve(cfg)
        self.state = ServerState(theta.detach().clone() if copy else theta.detach())
        self._phase: tuple[int, ServerPhase] | None = None  # (model version, its phase): asked once per client

    @property
    def phase(self) -> ServerPhase:
        """The server rule that applies an update to the current model version (computed once per version,
        whoever replaced ``state``: FedAsync, a resumed checkpoint)."""
        if self._phase is None or self._phase[0] != self.state.step:
            self._phase = (self.state.step, phase_at(self.algo, self.cfg, self.state.step))
        return self._phase[1]

    @property
    def finetuning(self) -> bool:
        """Whether the current version is past the algorithm's first phase (pfedavg: Reptile fine-tuning)."""
        return self.phase.start > 0

    def client_weight(self, num_samples: int) -> float:
        """Aggregation weight of a client update applied at the current model version."""
        return float(num_samples) if self.phase.weighting == "samples" else 1.0

    def client_weights(self, num_samples: np.ndarray) -> np.ndarray:
        """``client_weight`` of many clients at once, as float64 (the same values: integer sample counts are exact)."""
        n = np.asarray(num_samples)
        return n.astype(np.float64) if self.phase.weighting == "samples" else np.ones(n.shape, np.float64)

    def step(self, g: torch.Tensor) -> torch.Tensor:
        """Apply pseudo-gradient ``g``; returns the new parameters: the state's own tensor, not a copy (nothing
        changes a server vector in place: every step makes a new one), so a model-sized copy is saved a round."""
        return self._apply(lambda local, rule: rule(local, g.to(local.theta.dtype)))

    def step_mean(self, mean: torch.Tensor, block: int = STEP_BLOCK) -> torch.Tensor:
        """``step(record.pseudo_gradient(algorithm, mean))`` for a round's mean client vector, computed ``block``
        values at a time (``blockwise``): the same bits, without a model-sized pseudo-gradient or temporaries.
        ``mean`` is only read (it may be a read-only view of Ray's object store)."""
        dtype = self.state.theta.dtype
        return self._apply(lambda local, rule: blockwise(
            rule, local, lambda sl: pseudo_gradient(self.algo, mean[sl]).to(dtype), mean.numel(), block))

    def _apply(self, run: Callable[[ServerState, Rule], ServerState]) -> torch.Tensor:
        """The current phase's rule applied by ``run`` to the state, its moments fresh at a phase's first step."""
        st, ph = self.state, self.phase
        fresh = st.step == ph.start  # the first step of a phase: its optimizer's moments start afresh
        local = ServerState(st.theta, st.step - ph.start, None if fresh else st.momentum,
                            None if fresh else st.exp_avg, None if fresh else st.exp_avg_sq)
        if ph.optimizer == "adam":
            rule: Rule = lambda s, g: adam_step(s, g, ph.lr)  # noqa: E731
        elif ph.optimizer in FEDOPT:
            c = self.cfg
            rule = lambda s, g: fedopt_step(s, g, ph.optimizer, ph.lr, c.server_beta1, c.server_beta2,  # noqa: E731
                                            c.server_tau)
        else:
            rule = lambda s, g: sgd_step(s, g, ph.lr, ph.momentum)  # noqa: E731
        new = run(local, rule)
        self.state = ServerState(new.theta, st.step + 1, new.momentum, new.exp_avg, new.exp_avg_sq)
        return self.state.theta

    @property
    def params(self) -> torch.Tensor:
        return self.state.theta.clone()
