"""The built-in generated datasets: MAML's sinusoid regression tasks and FedProx's Synthetic(alpha, beta).

Both are pure functions of (parameters, seed, client id): a shard is generated where it is used.
"""

from __future__ import annotations

import numpy as np
import torch

from simulator.config.schema import DataConfig
from simulator.data.base import ClientShard, Split
from simulator.rng import generator


class Sinusoid:
    """The sinusoid regression benchmark of MAML (Finn et al. 2017, Sec. 5.1).

    Each client is one task: amplitude A ~ U[0.1, 5.0], phase ~ U[0, pi], inputs x ~ U[-5, 5],
    targets y = A sin(x - phase). ``shots`` points form the support set (K-shot), ``query``
    further points the query set.
    """

    task = "regression"
    input_dim = 1
    output_dim = 1
    input_dtype = torch.float32

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.shots, self.query, self.seed = cfg.shots, cfg.query, seed

    def shard(self, client_id: int) -> ClientShard:
        rng = generator(self.seed, "data", 0, client_id)
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
        x = rng.uniform(-5.0, 5.0, size=(self.shots + self.query, 1))
        y = amplitude * np.sin(x - phase)
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
        k = self.shots
        return ClientShard(client_id, Split(xt[:k], yt[:k]), Split(xt[k:], yt[k:]))

    def num_samples(self, client_id: int) -> int:
        return self.shots + self.query

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        return self.shots, self.query

    def label_histogram(self) -> None:
        return None


class Synthetic:
    """FedProx's Synthetic(alpha, beta) classification data (Li et al. 2020, Sec. 5.1).

    For client k: u_k ~ N(0, alpha), B_k ~ N(0, beta), v_k[j] ~ N(B_k, 1), W_k, b_k ~ N(u_k, 1),
    x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2), y = argmax softmax(W_k x + b_k); 60 features,
    10 classes. ``iid``: one W, b ~ N(0, 1) shared by all clients and v_k = 0. Sizes are
    ``samples_per_client`` or, when 0, FedProx's log-normal sizes int(LogNormal(4, 2)) + 50.
    As in FedProx's generator, alpha and beta are passed to ``normal`` as its scale.
    """

    task = "classification"
    input_dim = 60
    output_dim = 10
    input_dtype = torch.float32

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self._sigma = np.sqrt(np.arange(1, self.input_dim + 1, dtype=np.float64) ** -1.2)

    def num_samples(self, client_id: int) -> int:
        if self.cfg.samples_per_client:
            return self.cfg.samples_per_client
        rng = generator(self.seed, "sizes", 0, client_id)
        return int(rng.lognormal(4.0, 2.0)) + 50

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        n = self.num_samples(client_id)
        n_test = min(max(1, round(n * self.cfg.test_fraction)), n - 1)
        return n - n_test, n_test

    def label_histogram(self) -> None:
        return None

    def _model(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, c = self.input_dim, self.output_dim
        if self.cfg.iid:
            shared = generator(self.seed, "data_global")
            w, b = shared.normal(0.0, 1.0, (d, c)), shared.normal(0.0, 1.0, c)
            return w, b, np.zeros(d)
        u = rng.normal(0.0, self.cfg.alpha)
        big_b = rng.normal(0.0, self.cfg.beta)
        v = rng.normal(big_b, 1.0, d)
        w, b = rng.normal(u, 1.0, (d, c)), rng.normal(u, 1.0, c)
        return w, b, v

    def shard(self, client_id: int) -> ClientShard:
        rng = generator(self.seed, "data", 0, client_id)
        w, b, v = self._model(rng)
        k, n_test = self.split_sizes(client_id)
        n = k + n_test
        x = rng.standard_normal((n, self.input_dim))
        x *= self._sigma
        x += v  # in place: the same values as v + z * sigma (IEEE addition commutes), no temporaries
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of the logits
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
        return ClientShard(client_id, Split(xt[:k], yt[:k]), Split(xt[k:], yt[k:]))
