"""``metafleet data``: what a configured federated dataset looks like, before any run.

Client sizes come from ``split_sizes`` (the dataset's index: no shard is built, so this is cheap
for 100k+ clients); label statistics from ``label_histogram`` where the dataset has one
(classification data: pooled, LEAF, tables). The label skew is the mean total-variation distance
between each client's label distribution and the global one, 0.5 * sum_k |p_c(k) - p(k)|
(0 for IID clients, close to 1 when every client holds one class that is rare globally), and the
mean number of distinct labels per client, as reported for LEAF's datasets (Caldas et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from simulator.config.schema import DataConfig, ExperimentConfig
from simulator.data.base import FederatedDataset
from simulator.data.registry import make_dataset

#: clients shown in the label-distribution panel
SHOWN_CLIENTS = 30


@dataclass(frozen=True)
class DatasetSummary:
    """Per-client sizes and label counts of a dataset's training and held-out clients."""

    name: str                      # data.name, with the detected kind for LEAF (e.g. "leaf (femnist)")
    task: str
    input_dim: int
    output_dim: int
    num_clients: int               # training clients: ids 0 .. num_clients-1
    eval_clients: int              # held-out clients: the next ids
    support: np.ndarray            # support size of every client (training then held-out)
    query: np.ndarray              # query size of every client
    histogram: np.ndarray | None   # clients x classes label counts, or None
    skipped: int = 0               # users / clients of the files left out (too few samples)
    note: str = ""                 # "all 40 users of data.path but the 10 held out" (``all_clients_note``)

    @property
    def sizes(self) -> np.ndarray:
        return self.support + self.query

    def label_skew(self) -> tuple[float, float] | None:
        """(mean total-variation distance to the global label distribution, mean distinct labels per client)."""
        if self.histogram is None:
            return None
        hist = self.histogram[self.histogram.sum(axis=1) > 0].astype(np.float64)
        if not len(hist):
            return None
        own = hist / hist.sum(axis=1, keepdims=True)
        pooled = hist.sum(axis=0) / hist.sum()
        return float(0.5 * np.abs(own - pooled).sum(axis=1).mean()), float((hist > 0).sum(axis=1).mean())


def all_clients_note(cfg: DataConfig, dataset: FederatedDataset) -> str:
    """For a file dataset whose training clients are all its clients but the held-out ones (what an unset
    ``data.num_clients`` means), that fact in words; else ""."""
    available = int(getattr(dataset, "available", 0))
    if not available or cfg.num_clients + cfg.eval_clients != available:
        return ""
    what = "users" if cfg.name == "leaf" else "clients"
    return f"all {available} {what} of data.path but the {cfg.eval_clients} held out"


def summarize_dataset(cfg: ExperimentConfig) -> DatasetSummary:
    """Build the configured dataset (a ConfigError on bad input) and collect its client statistics."""
    dataset = make_dataset(cfg.data, cfg.seed)
    total = cfg.data.num_clients + cfg.data.eval_clients
    sizes = np.array([dataset.split_sizes(c) for c in range(total)], dtype=np.int64).reshape(total, 2)
    histogram = dataset.label_histogram() if dataset.task == "classification" else None
    kind = getattr(dataset, "kind", "")
    skipped = int(getattr(dataset, "skipped_users", 0) or getattr(dataset, "skipped_clients", 0))
    return DatasetSummary(f"{cfg.data.name} ({kind})" if kind else cfg.data.name, dataset.task, dataset.input_dim,
                          dataset.output_dim, cfg.data.num_clients, cfg.data.eval_clients, sizes[:, 0], sizes[:, 1],
                          None if histogram is None else np.asarray(histogram, dtype=np.int64), skipped,
                          all_clients_note(cfg.data, dataset))


def _spread(values: np.ndarray) -> str:
    return f"{int(values.min())} / {float(np.median(values)):g} / {int(values.max())}"


def summary_lines(s: DatasetSummary) -> list[str]:
    """The printed summary: one fact per line."""
    labels = f"{s.output_dim} classes" if s.task == "classification" else "regression"
    lines = [f"dataset: {s.name}, {s.task}, input dimension {s.input_dim}, {labels}",
             f"clients: {s.num_clients} training{f' ({s.note})' if s.note else ''}, {s.eval_clients} held-out"
             + (f" ({s.skipped} more in the files skipped: too few samples)" if s.skipped else ""),
             f"samples: {int(s.sizes.sum())} in all; per client (min / median / max): {_spread(s.sizes)}",
             f"  support (train) per client: {_spread(s.support)}",
             f"  query (test) per client: {_spread(s.query)}"]
    skew = s.label_skew()
    if skew is None:
        lines.append("label skew: n/a (no per-client label counts for this dataset)")
    else:
        lines.append(f"label skew: mean total-variation distance to the global label distribution {skew[0]:.3f}; "
                     f"{skew[1]:.2f} distinct labels per client on average (of {s.output_dim})")
    return lines


def data_figure(s: DatasetSummary) -> Figure:
    """Client sizes (histogram) and the label proportions of the first ``SHOWN_CLIENTS`` training clients."""
    fig = Figure(figsize=(12.0, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.0, 1.3])
    sizes = s.sizes
    lo, hi = max(int(sizes.min()), 1), int(sizes.max())
    log_scale = hi / lo > 50
    bins = np.geomspace(lo, hi + 1, 40) if log_scale else np.linspace(lo - 0.5, hi + 0.5, min(40, hi - lo + 1) + 1)
    left.hist([sizes[:s.num_clients], sizes[s.num_clients:]], bins=bins, stacked=True, color=["#0072B2", "#E69F00"],
              label=[f"training ({s.num_clients})", f"held-out ({s.eval_clients})"])
    if log_scale:
        left.set_xscale("log")
    left.set(xlabel="samples per client (support + query)", ylabel="clients", title="client sizes")
    left.legend(frameon=False)
    if s.histogram is not None:
        shown = s.histogram[:min(SHOWN_CLIENTS, s.num_clients)].astype(np.float64)
        props = shown / np.maximum(shown.sum(axis=1, keepdims=True), 1.0)
        image = right.imshow(props, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
        fig.colorbar(image, ax=right, label="fraction of the client's samples")
        right.set(xlabel="label", ylabel="client id", title=f"label distribution of clients 0..{len(shown) - 1}")
    else:
        right.scatter(s.support, s.query, s=8, color="#009E73", alpha=0.6)
        right.set(xlabel="support samples", ylabel="query samples",
                  title="support vs query size per client (no label counts)")
    fig.suptitle(f"{s.name}: {s.num_clients} training + {s.eval_clients} held-out clients")
    return fig


def write_figure(s: DatasetSummary, out: str | Path) -> Path:
    """Write ``data_figure`` to ``out`` (format from its suffix; png when it has none), without dates."""
    path = Path(out)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {".png": {"Software": None}, ".svg": {"Date": None}, ".pdf": {"CreationDate": None}}
    data_figure(s).savefig(path, dpi=150, metadata=metadata.get(path.suffix.lower()))
    return path
