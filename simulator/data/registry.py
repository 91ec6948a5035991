"""The dataset registry: ``data.name`` -> the class that builds it. Config validation takes its choices from
``DATASETS``; the worker and the driver build datasets through ``make_dataset``."""

from __future__ import annotations

from collections.abc import Callable

from simulator.config.schema import DataConfig
from simulator.data.base import FederatedDataset
from simulator.data.builtin import Sinusoid, Synthetic
from simulator.data.leaf import LeafDataset
from simulator.data.pooled import make_pooled
from simulator.data.tables import TableDataset

#: every dataset ``data.name`` can name, with the callable ``(cfg, seed) -> FederatedDataset`` that builds it
DATASETS: dict[str, Callable[[DataConfig, int], FederatedDataset]] = {
    "sinusoid": Sinusoid,
    "synthetic": Synthetic,
    "gaussian": make_pooled,
    "digits": make_pooled,
    "leaf": LeafDataset,
    "table": TableDataset,
}


def make_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The dataset ``cfg.name`` with its parameters (config validation has checked the name)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[cfg.name](cfg, seed)
