"""Models: the built-in MLP, users' own ``torch.nn.Module`` factories, and flat parameter vectors.

The server model travels as one flat float32 vector (``flat_params``); a worker writes it into
its local copy of the module (``load_flat``). Initial weights come from a seeded torch
generator state, never from the global RNG's current state.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from simulator.config import ConfigError, ModelConfig
from simulator.rng import torch_seed


def mlp(input_dim: int, output_dim: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


def _load_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's factory path
        raise ConfigError(f"model.factory = {path!r}: cannot import {module_name!r} ({exc}); "
                          "make the module importable (installed, or on PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model.factory = {path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def build_model(cfg: ModelConfig, input_dim: int, output_dim: int, seed: int) -> nn.Module:
    """Build the model with weights drawn from the run seed (purpose "init").

    A factory is called as ``factory(input_dim=..., output_dim=...)`` when it takes those
    arguments, else with none; it must return a ``torch.nn.Module``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "init"))
        if cfg.factory:
            fn = _load_factory(cfg.factory)
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):  # builtins and C types may have no signature
                params = {}
            kwargs = {"input_dim": input_dim, "output_dim": output_dim}
            try:
                model = fn(**{k: v for k, v in kwargs.items() if k in params})
            except Exception as exc:
                raise ConfigError(f"model.factory = {cfg.factory!r} raised {type(exc).__name__}: {exc}") from None
            if not isinstance(model, nn.Module):
                raise ConfigError(f"model.factory = {cfg.factory!r} returned {type(model).__name__}, "
                                  "not a torch.nn.Module; return the module instance")
        else:
            model = mlp(input_dim, output_dim, cfg.hidden)
    return model


def check_output_shape(model: nn.Module, input_dim: int, output_dim: int) -> None:
    """Reject a model whose output does not fit the data, before any run directory is written."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, input_dim))
    except Exception as exc:
        raise ConfigError(f"the model cannot take inputs of shape (batch, {input_dim}) from the data: "
                          f"{type(exc).__name__}: {exc}; fix model.hidden or model.factory") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, output_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model outputs {shape} for a batch of 2, the data needs (2, {output_dim}); "
                          "fix model.factory's output layer")
    if not list(model.parameters()):
        raise ConfigError("the model has no trainable parameters; fix model.factory")


def flat_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one detached, contiguous float32 CPU vector."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().to("cpu", torch.float32).clone()


def load_flat(model: nn.Module, theta: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters (in place; ``theta`` itself is never aliased)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(theta[offset:offset + n].view_as(p))
            offset += n
    if offset != theta.numel():
        raise ValueError(f"theta has {theta.numel()} values, the model {offset} parameters")
