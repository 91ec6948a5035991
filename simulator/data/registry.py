"""The dataset registry: ``data.name`` -> the class that builds it. Config validation takes its choices from
``DATASETS``; the worker and the driver build datasets through ``make_dataset``."""

from __future__ import annotations

from collections.abc import Callable

from simulator.config.schema import DataConfig
from simulator.data.base import FederatedDataset
from simulator.data.builtin import Sinusoid, Synthetic
from simulator.data.leaf import LeafDataset
from simulator.data.leaf import available_clients as leaf_clients
from simulator.data.pooled import make_pooled
from simulator.data.tables import TableDataset
from simulator.data.tables import available_clients as table_clients

#: every dataset ``data.name`` can name, with the callable ``(cfg, seed) -> FederatedDataset`` that builds it
DATASETS: dict[str, Callable[[DataConfig, int], FederatedDataset]] = {
    "sinusoid": Sinusoid,
    "synthetic": Synthetic,
    "gaussian": make_pooled,
    "digits": make_pooled,
    "leaf": LeafDataset,
    "table": TableDataset,
}


#: datasets read from the user's files, with the callable ``(cfg) -> how many clients they hold``: for them an
#: unset ``data.num_clients`` means every client of the files but the ``data.eval_clients`` held out
FILE_DATASETS: dict[str, Callable[[DataConfig], int]] = {
    "leaf": leaf_clients,
    "table": table_clients,
}


def make_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """The dataset ``cfg.name`` with its parameters (config validation has checked the name)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[cfg.name](cfg, seed)
