"""Asynchronous federated optimization in simulated time: FedBuff and FedAsync.

``max_concurrency`` clients are always training. Each starts from the model version current at
its (simulated) start, and its completion time is known at dispatch (device profile + planned
samples), so completions are applied in simulated-time order, ties broken by client id, never
in the order Ray returns them. Meanwhile the training work of every in-flight client runs in
parallel on the actor pool: a client is submitted as soon as its model version is final, and
the driver blocks only on the one result the next event needs.

At each simulated instant, all completions at that instant are applied first; then the free
slots are refilled as one *refill group* (one seeded sample, and the key of those clients'
batch streams). Server rules:

- FedBuff (Nguyen et al. 2022, Alg. 1): buffer K = ``async.buffer_size`` updates, then apply
  theta <- theta - server_lr * g with g = -(1/K) sum_i s(tau_i) Delta_i through the server
  optimizer (``aggregation.fedbuff_mean``; FedAvg weights c_i = n_i replace 1/K by c_i / sum c). The clients'
  vectors stay where they were computed (in the object store, ``system.combine``) and one worker sums the buffer's
  rows on the exact grid (``Backend.release_rows``): the driver receives per-client scalars and one mean per update.
- FedAsync (Xie et al. 2019, Alg. 1): every update mixes theta <- (1 - a_t) theta + a_t theta_i with
  a_t = mixing * s(tau), theta_i = theta_{v_i} - server_lr * g_i the client's model from its start version.

Staleness tau = (server version at arrival) - (version the client started from); updates with
tau > ``max_staleness`` (when > 0) are dropped. Reptile and FedAvg deltas and MAML
meta-gradients are all computed against the stale version the client started from. With
K = per_round = max_concurrency and identical devices, FedBuff reproduces sync rounds exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from simulator.algorithms.aggregation import fedasync_mix, fedbuff_coefficients, staleness_one
from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid
from simulator.algorithms.record import pseudo_gradient
from simulator.algorithms.server import ServerState, update_norm
from simulator.contract import Reduction, Release, Selection
from simulator.params import readonly_tensor
from simulator.rounds.context import RunContext
from simulator.rounds.retry import with_retries
from simulator.rounds.rows import client_rows, round_row
from simulator.rundir.checkpoint import plain
from simulator.scheduling import Event, EventQueue, Profiles, SampleStreams, sample_clients

log = logging.getLogger("metafleet.async")

#: consecutive refills that dispatch nobody before a run is declared stalled
MAX_EMPTY_REFILLS = 10_000


class Stalled(RuntimeError):
    """No client can ever be online again (availability trace exhausted)."""


@dataclass
class Flight:
    """One dispatched client's bookkeeping, from dispatch to its completion event."""

    client_id: int
    key: int            # refill group: the key of its batch stream
    start: float
    finish: float
    version: int        # the model version it started from
    dropout: bool
    num_samples: int
    samples: int
    profile: tuple[float, float, float]
    pending: Any = None
    row: int = -1       # its position in ``pending``'s clients (found by search when it is not)
    result: dict[str, Any] = field(default_factory=dict)


class AsyncServer:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx, cfg = ctx, ctx.cfg
        self.cfg, self.acfg = cfg, cfg.async_
        self.concurrency = cfg.system.max_concurrency or cfg.clients.per_round
        self.theta, self.version, self.now, self.updates = ctx.opt.state.theta, 0, 0.0, 0  # never changed in place
        # the model of every version some in-flight client started from: FedAsync mixes against it,
        # and a lost or resumed client's work is re-run from it
        self.bases: dict[int, torch.Tensor] = {0: self.theta}
        self.base_refs: dict[int, int] = {}
        self.queue, self.held, self.group, self.seq = EventQueue(), [], 0, 0
        self.streams = SampleStreams(cfg.seed)  # refill groups are consecutive keys: their streams seeded in bulk
        self.buffer: list[tuple[Flight, float]] = []
        self._array: tuple[torch.Tensor, np.ndarray] | None = None  # the last submitted model, as the array sent
        self._reset_window()
        if ctx.resumed:
            self._restore(ctx.resumed)

    def _reset_window(self) -> None:
        """Accumulators of what happened since the last server update (one rounds row)."""
        self.window_start, self.dispatched, self.bytes_up, self.bytes_down = self.now, 0, 0, 0
        self.reasons: list[str] = []
        self.rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ dispatch
    def refill(self) -> int:
        free = self.concurrency - len(self.queue)
        if free <= 0:
            return 0
        key, self.group = self.group, self.group + 1
        ids = sample_clients(self.cfg.seed, key, self.cfg.data.num_clients, free, self.queue.client_ids(),
                             self.streams.get(key))
        if not ids.size:
            return 0
        profiles, n_samples, samples, durations = self.ctx.plan(ids)
        online = self.ctx.devices.online(ids, self.now, key)
        frac = self.ctx.devices.dropout_fraction(ids, key)
        for i, cid in enumerate(ids.tolist()):
            prof = (profiles.compute_speed[i], profiles.up_bw[i], profiles.down_bw[i])
            drop = not math.isnan(frac[i])
            f = Flight(cid, key, self.now, self.now + (frac[i] * durations[i] if drop else durations[i]),
                       self.version, drop, int(n_samples[i]), int(samples[i]), prof)
            if not online[i]:
                f.finish = self.now
                self._record(f, "offline")
                continue
            self.dispatched += 1
            self.bytes_down += self.ctx.model_bytes
            self.queue.push(Event(f.finish, cid, self.seq, f))
            self.seq += 1
            if not drop:
                self.held.append(f)
                self.base_refs[f.version] = self.base_refs.get(f.version, 0) + 1
        return int(online.sum())

    def flush_held(self) -> None:
        """Submit the dispatched-but-unsubmitted clients (all on the current model) as one cohort."""
        if self.held:
            self._submit(self.held, self.theta)
        self.held = []

    def _submit(self, flights: list[Flight], theta: torch.Tensor) -> None:
        """One cohort on one model; FedBuff's vectors stay where they are computed until its buffer is summed."""
        by_id = {f.client_id: f for f in flights}
        ids = np.array(sorted(by_id), np.int64)
        keys = np.array([by_id[c].key for c in ids.tolist()], np.int64)
        if self._array is None or self._array[0] is not theta:  # one array per model: a backend may reuse its copy
            self._array = (theta, theta.numpy())
        for pending in self.ctx.backend.submit(self._array[1], keys, ids, keep=self.acfg.rule == "fedbuff"):
            for row, cid in enumerate(pending.client_ids):
                by_id[int(cid)].pending, by_id[int(cid)].row = pending, row

    def fetch(self, f: Flight) -> dict[str, Any]:
        if f.pending is None:
            self.flush_held()
        res = with_retries(lambda: self.ctx.backend.result(f.pending), f"training client {f.client_id}",
                           self.cfg.system.max_failures, lambda: self._submit([f], self.bases[f.version]),
                           self.ctx.errors_log)
        i = f.row
        if not 0 <= i < len(res.client_ids) or int(res.client_ids[i]) != f.client_id:
            i = int(np.flatnonzero(res.client_ids == f.client_id)[0])
        if int(res.samples_processed[i]) != f.samples:
            raise RuntimeError("a worker processed a different number of samples than planned at dispatch")
        f.pending = None
        assert res.accepted is not None and res.update_norm is not None and res.clip_norm is not None
        return {"actor_id": res.worker_id, "vector": res.vectors[i] if res.kept is None else None, "kept": res.kept,
                "row": i, "num_samples": int(res.num_samples[i]), "loss_before": float(res.loss_before[i]),
                "loss_after": float(res.loss_after[i]), "compute_time_s": float(res.compute_time_s[i]),
                "accepted": bool(res.accepted[i]), "update_norm": float(res.update_norm[i]),
                "clip_norm": float(res.clip_norm[i])}

    # ------------------------------------------------------------------ events
    def process(self, ev: Event) -> None:
        f: Flight = ev.info
        self.now = ev.time
        if f.dropout:
            self._record(f, "dropout")
            return
        f.result = self.fetch(f)
        self.bytes_up += self.ctx.update_bytes
        tau = self.version - f.version
        if not f.result["accepted"]:  # a non-finite update or loss (the worker's ``summarize``)
            self._release(f.version)
            self._record(f, "nonfinite")
            return
        if self.cfg.system.max_staleness and tau > self.cfg.system.max_staleness:
            self._release(f.version)
            self._record(f, "staleness")
            return
        s = staleness_one(self.acfg.staleness, tau, self.acfg.staleness_a, self.acfg.staleness_b)
        self.buffer.append((f, s))
        if self.acfg.rule == "fedasync" or len(self.buffer) >= self.acfg.buffer_size:
            self.server_update()

    def server_update(self) -> None:
        self.flush_held()  # clients dispatched on the current model go out before it changes
        algo, ctx = self.ctx.algo, self.ctx
        flights = [f for f, _ in self.buffer]
        dp, ids = ctx.privacy, np.array([f.client_id for f in flights], np.int64)
        if dp.on:  # the budget stop, before a server update that would take epsilon past the target
            dp.check(int(np.unique(ids, return_counts=True)[1].max()))
        s = torch.tensor([w for _, w in self.buffer], dtype=torch.float64)
        c = torch.tensor([1.0 if dp.on else ctx.opt.client_weight(f.result["num_samples"]) for f in flights],
                         dtype=torch.float64)
        old = self.theta
        if self.acfg.rule == "fedbuff":
            mean = with_retries(lambda: self._buffer_mean(s, c), f"the sum of server update {self.updates}'s buffer",
                                self.cfg.system.max_failures, self._train_buffer_again, ctx.errors_log)
            if dp.on:  # the adaptive clip and the ledger, from the norms the workers computed
                dp.record(np.array([f.result["clip_norm"] for f in flights]), ids, self.updates, self.acfg.buffer_size)
            self.theta = ctx.opt.step_mean(readonly_tensor(mean))
            del mean
        else:
            (f,) = flights
            vec = (dp.mean(f.result["vector"][None], ids, f.key, self.updates, 1) if dp.on
                   else torch.from_numpy(np.array(f.result["vector"])))
            g = pseudo_gradient(algo, vec)
            client_theta = self.bases[f.version] - self.cfg.algorithm.server_lr * g
            self.theta = fedasync_mix(old, client_theta, self.acfg.mixing, float(s[0]))
            ctx.opt.state = ServerState(self.theta, ctx.opt.state.step + 1)  # a new tensor, never changed in place
        tau = np.array([self.version - f.version for f in flights], np.float64)
        for (f, w), ci in zip(self.buffer, c.tolist(), strict=True):
            self._record(f, "", weight=ci, staleness_w=w)
        self.version += 1
        self.bases[self.version] = self.theta
        if not self.base_refs.get(self.version - 1):
            self.bases.pop(self.version - 1, None)
        for f in flights:
            self._release(f.version)
        row = round_row(self.updates, self.version, self.now, self.window_start, self.dispatched, self.reasons, tau,
                        self.bytes_up, self.bytes_down, np.array([f.result["loss_after"] for f in flights]),
                        np.array([f.result["loss_before"] for f in flights]),
                        update_norm(self.theta, old))
        self._write_clients()
        self.buffer = []
        ctx.record_round(row, self.theta)
        self.updates += 1
        self._reset_window()

    def _buffer_mean(self, s: torch.Tensor, c: torch.Tensor) -> np.ndarray:
        """FedBuff's float32 mean (1/K) sum_i s(tau_i) Delta_i (FedAvg: c_i / sum c instead of 1/K;
        ``aggregation.fedbuff_mean``), or under DP the clipped, noised, s(tau_i)-weighted sum over the fixed
        denominator K (``simulator.privacy``), summed by the backend from the rows its workers kept
        (``Backend.release_rows``): the driver receives one vector, however many clients the buffer holds."""
        flights, dp = [f for f, _ in self.buffer], self.ctx.privacy
        ids = np.array([f.client_id for f in flights], np.int64)
        positions = np.arange(len(flights))
        blocks: list[Any] = []
        where: dict[int, int] = {}  # id of a chunk's handle -> its index in ``blocks``
        for f in flights:
            if id(f.result["kept"]) not in where:
                where[id(f.result["kept"])] = len(blocks)
                blocks.append(f.result["kept"])
        if dp.on:
            red = dp.reduction(ids, self.acfg.buffer_size, s.numpy())
            release = dataclasses.replace(dp.finishing(ids, self.updates, self.acfg.buffer_size), order=positions)
        else:
            coefs = fedbuff_coefficients(s, c).numpy()
            red = Reduction(ids, coefs, Grid.for_bound(DEFAULT_BOUND, float(np.abs(coefs).sum())))
            release = Release(positions)
        sel = Selection(np.array([where[id(f.result["kept"])] for f in flights], np.int64),
                        np.array([f.result["row"] for f in flights], np.int64), red,
                        np.array([f.key for f in flights], np.int64))
        return self.ctx.backend.release_rows(blocks, sel, release, self.theta.numel())

    def _train_buffer_again(self) -> None:
        """The buffer's kept rows were lost (a node died): its clients train again from their start models, with
        the same results (a client's work is a pure function of its model, id and key)."""
        groups: dict[tuple[int, int], list[Flight]] = {}  # (start version, refill group): a client once in each
        for f, _ in self.buffer:
            groups.setdefault((f.version, f.key), []).append(f)
        for (version, _), flights in sorted(groups.items()):
            self._submit(flights, self.bases[version])
        for f, _ in self.buffer:
            f.result = self.fetch(f)

    def _release(self, version: int) -> None:
        self.base_refs[version] -= 1
        if not self.base_refs[version]:
            del self.base_refs[version]
            if version != self.version:
                self.bases.pop(version, None)

    def _record(self, f: Flight, reason: str, weight: float = math.nan, staleness_w: float = math.nan) -> None:
        if reason:
            self.reasons.append(reason)
        r = f.result
        self.rows.append({
            "client_id": f.client_id, "num_samples": f.num_samples, "start": f.start, "finish": f.finish,
            "reason": reason, "version": f.version, "staleness": self.version - f.version if r else 0,
            "staleness_weight": staleness_w, "profile": f.profile, "actor_id": r.get("actor_id", -1),
            "samples_processed": f.samples if r else 0, "weight": weight,
            "loss_before": r.get("loss_before", math.nan), "loss_after": r.get("loss_after", math.nan),
            "update_norm": r.get("update_norm", math.nan),
            "compute_time_s": r.get("compute_time_s", math.nan)})

    def _write_clients(self) -> None:
        rows = self.rows
        if not rows:
            return
        col = lambda k, dt=np.float64: np.array([x[k] for x in rows], dt)  # noqa: E731
        prof = np.array([x["profile"] for x in rows], np.float64)
        ids = col("client_id", np.int64)
        trained = {"actor_id": col("actor_id", np.int64), "samples_processed": col("samples_processed", np.int64),
                   "weight": col("weight"), "loss_before": col("loss_before"), "loss_after": col("loss_after"),
                   "update_norm": col("update_norm"), "compute_time_s": col("compute_time_s")}
        self.ctx.writer.tables["clients"].extend(client_rows(
            self.updates, ids, Profiles(ids, prof[:, 0], prof[:, 1], prof[:, 2]), col("num_samples", np.int64),
            col("start"), col("finish"), np.array([x["reason"] for x in rows], dtype=object),
            col("version", np.int64), col("staleness", np.int64), col("staleness_weight"), trained))

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        empty, done = 0, self.updates
        if not self.ctx.resumed:
            self.refill()
        while self.updates < self.cfg.rounds:
            if not len(self.queue):
                nxt = self.ctx.devices.next_online_time(self.now)
                empty += 1
                if nxt is None or empty > MAX_EMPTY_REFILLS:
                    raise Stalled(f"no client can come online after simulated time {self.now:.1f} s")
                self.now = max(self.now, nxt)
                self.refill()
                continue
            empty = 0
            self.process(self.queue.pop())
            if self.queue.peek_time() != self.now:
                self.refill()
            if self.updates != done:  # a server update completed: a consistent state to resume from
                done = self.updates
                self.ctx.completed(done, self.snapshot())


    # ------------------------------------------------------------------ checkpoint
    def snapshot(self) -> Callable[[], dict[str, Any]]:
        """The state between two events, right after a server update (the buffer is empty): cheap
        copies now, encoded for ``simulator.rundir.checkpoint`` only when a checkpoint is written."""
        events, bases, refs = self.queue.events(), dict(self.bases), dict(self.base_refs)
        scalars = {"version": self.version, "now": self.now, "group": self.group, "seq": self.seq}
        window = {"window_start": self.window_start, "dispatched": self.dispatched, "bytes_up": self.bytes_up,
                  "bytes_down": self.bytes_down, "reasons": list(self.reasons), "rows": list(self.rows)}
        flights = [(e.seq, e.info) for e in events]

        def encode() -> dict[str, Any]:
            return plain({**scalars, "bases": bases, "base_refs": refs, "window": window,
                          "flights": [{**{k: getattr(f, k) for k in FLIGHT_FIELDS}, "seq": seq} for seq, f in flights]})

        return encode

    def _restore(self, st: dict[str, Any]) -> None:
        """Continue from a checkpoint: the in-flight clients' work is submitted again from their start models."""
        self.version, self.now, self.group, self.seq = st["version"], st["now"], st["group"], st["seq"]
        self.updates = st["next_round"]
        self.bases, self.base_refs = dict(st["bases"]), dict(st["base_refs"])
        for name, value in st["window"].items():
            setattr(self, name, list(value) if isinstance(value, list) else value)
        self.rows = [{**r, "profile": tuple(r["profile"])} for r in self.rows]
        stale: dict[int, list[Flight]] = {}
        for fd in st["flights"]:
            f = Flight(**{k: fd[k] for k in FLIGHT_FIELDS})
            f.profile = tuple(f.profile)
            self.queue.push(Event(f.finish, f.client_id, fd["seq"], f))
            if not f.dropout:
                stale.setdefault(f.version, []).append(f)
        self.held = stale.pop(self.version, [])
        for version, flights in sorted(stale.items()):
            self._submit(flights, self.bases[version])


FLIGHT_FIELDS = ("client_id", "key", "start", "finish", "version", "dropout", "num_samples", "samples", "profile")


def async_rounds(ctx: RunContext) -> None:
    """``cfg.rounds`` server updates of FedBuff or FedAsync; one rounds.parquet row per update."""
    AsyncServer(ctx).run()
