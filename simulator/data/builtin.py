"""The built-in generated datasets: MAML's sinusoid regression tasks and FedProx's Synthetic(alpha, beta).

Both are pure functions of (parameters, seed, client id): a shard is generated where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from simulator.config.schema import DataConfig
from simulator.data.base import ClientShard
from simulator.rng import generator, generators


class _Generated:
    """A dataset whose client c's shard is drawn from the stream (seed, "data", 0, c) by ``_shard``."""

    seed: int

    def shard(self, client_id: int) -> ClientShard:
        return self._shard(client_id, generator(self.seed, "data", 0, client_id))

    def shards(self, client_ids: Sequence[int]) -> list[ClientShard]:
        """``[shard(c) ...]``, the clients' streams seeded in one pass (``rng.generators``)."""
        return [self._shard(c, rng) for c, rng in zip(client_ids, generators(self.seed, "data", 0, client_ids),
                                                         strict=True)]

    def _shard(self, client_id: int, rng: np.random.Generator) -> ClientShard:
        raise NotImplementedError


class Sinusoid(_Generated):
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

    def _shard(self, client_id: int, rng: np.random.Generator) -> ClientShard:
        amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)
        x = rng.uniform(-5.0, 5.0, size=(self.shots + self.query, 1))
        y = amplitude * np.sin(x - phase)
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
        k = self.shots
        return ClientShard.from_rows(client_id, xt, yt, k)

    def num_samples(self, client_id: int) -> int:
        return self.shots + self.query

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        return self.shots, self.query

    def label_histogram(self) -> None:
        return None


class Synthetic(_Generated):
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
        self._sigma_t = torch.from_numpy(np.sqrt(np.arange(1, self.input_dim + 1, dtype=np.float64) ** -1.2))

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

    @cached_property
    def _shared(self) -> tuple[np.ndarray, np.ndarray]:
        """The IID variant's one W, b ~ N(0, 1), drawn once."""
        shared = generator(self.seed, "data_global")
        return shared.normal(0.0, 1.0, (self.input_dim, self.output_dim)), shared.normal(0.0, 1.0, self.output_dim)

    def _shard(self, client_id: int, rng: np.random.Generator) -> ClientShard:
        return self._built([client_id], [rng])[0]

    def shards(self, client_ids: Sequence[int]) -> list[ClientShard]:
        """``[shard(c) ...]``: the clients' streams seeded in one pass (``rng.generators``) and, clients of one size
        together, the arithmetic after the draws done once for all of them (``_built``)."""
        ids = list(client_ids)
        rngs = generators(self.seed, "data", 0, ids)
        by_size: dict[int, list[int]] = {}
        for i, c in enumerate(ids):
            by_size.setdefault(self.num_samples(c), []).append(i)
        out: list[ClientShard | None] = [None] * len(ids)
        for rows in by_size.values():
            for i, shard in zip(rows, self._built([ids[i] for i in rows], [rngs[i] for i in rows]), strict=True):
                out[i] = shard
        return out  # type: ignore[return-value]

    def _built(self, client_ids: list[int], rngs: list[np.random.Generator]) -> list[ClientShard]:
        """The shards of m clients of one size n, from their streams: each client's draws into its row of one
        (m x draws) array, then every step after them on all m clients at once. Elementwise, the same operations
        on the same values as one client alone, and ``x @ W`` is one BLAS product per client either way
        (``np.matmul`` over a stack), so a shard's bits do not depend on the clients built with it."""
        k, n_test = self.split_sizes(client_ids[0])
        n, d, c, m = k + n_test, self.input_dim, self.output_dim, len(client_ids)
        if self.cfg.iid:
            (w, b), v = self._shared, None
            x = np.empty((m, n, d))
            for row, rng in zip(x, rngs, strict=True):
                rng.standard_normal(out=row)
        else:
            # FedProx's draws in their order, u, B, v (d), W (d x c), b (c), then x (n x d), as one standard-normal
            # stream per client: numpy's normal(loc, scale) is loc + scale * z for the stream's next z
            # (``random_normal`` in numpy's distributions.c), so with scale 1 (or loc 0) these are its values bit
            # for bit, from one call instead of six (tests/simulator/test_data.py compares them with the draws
            # made one by one)
            z = np.empty((m, 2 + d + d * c + c + n * d))
            for row, rng in zip(z, rngs, strict=True):
                rng.standard_normal(out=row)
            at = np.cumsum([0, 1, 1, d, d * c, c])  # offsets of u, B, v, W, b, x in a client's row
            u = 0.0 + self.cfg.alpha * z[:, at[0]]
            v = z[:, at[2]:at[3]]
            v += (0.0 + self.cfg.beta * z[:, at[1]])[:, None]  # v ~ N(B, 1)
            w = z[:, at[3]:at[4]].reshape(m, d, c)
            b = z[:, at[4]:at[5]]
            x = z[:, at[5]:].reshape(m, n, d)
            w += u[:, None, None]
            b += u[:, None]
            b = b[:, None, :]
        # x = v + z Sigma^(1/2), in place: IEEE products and sums, the same values as numpy's (torch's broadcasting
        # loops over the strided rows are several times faster)
        xt = torch.from_numpy(x).mul_(self._sigma_t)
        if v is not None:
            xt.add_(torch.from_numpy(v)[:, None, :])
        y = np.argmax(np.matmul(x, w) + b, axis=2)  # softmax is monotone: argmax of the logits
        x32, y64 = xt.to(torch.float32), torch.from_numpy(y.astype(np.int64))
        return [ClientShard.from_rows(cid, x32[i].clone(), y64[i].clone(), k) for i, cid in enumerate(client_ids)]
