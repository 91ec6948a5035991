"""Flat parameter vectors and per-parameter tensors, converted both ways: the one place that does it.

The server model travels as one flat float32 vector; a worker writes it into its module
(``load_flat``) or cuts it into name -> tensor dicts (``unflatten``) for functional steps, and client
steps concatenate their results back into a vector (``flatten``). Meta-SGD's learned rates
(Li et al. 2017) are a second vector of the same layout, cut the same way.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import nn

#: parameter name -> tensor, in ``model.named_parameters()`` order (optionally with a leading client dimension)
Params = dict[str, torch.Tensor]


def flat_params(model: nn.Module) -> torch.Tensor:
    """All trainable parameters as one detached, contiguous float32 CPU vector."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().to("cpu", torch.float32).clone()


def num_parameters(model: nn.Module) -> int:
    """Number of trainable values: the length of ``flat_params(model)``."""
    return sum(p.numel() for p in model.parameters())


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


def unflatten(model: nn.Module, vector: torch.Tensor, clients: int = 0) -> Params:
    """A flat vector as one tensor per parameter, shaped like it, on the parameter's device and dtype
    (views of ``vector`` where those already match). ``clients`` > 0: each tensor expanded along a new
    leading client dimension and copied, one independent copy per client (the vectorized path)."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        piece = vector[start:start + p.numel()].reshape(p.shape)
        out[name] = piece.expand(clients, *p.shape).clone() if clients else piece.to(p.device, p.dtype)
        start += p.numel()
    return out


def flat_delta(tensors: Params, theta: torch.Tensor) -> torch.Tensor:
    """``flatten(tensors) - theta`` as one new vector on the tensors' device, each tensor's stretch written by one
    subtraction: the same float32 differences, without the concatenated copy of the tensors first (a 26 MB vector
    per FEMNIST CNN client)."""
    values = list(tensors.values())
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in values), theta.dtype)  # as cat, then minus
    out = torch.empty(sum(t.numel() for t in values), dtype=dtype, device=next(iter(values), theta).device)
    if out.numel() != theta.numel():
        raise ValueError(f"the tensors hold {out.numel()} values, theta {theta.numel()}")
    base, start = theta.to(out.device, dtype), 0  # both sides in the promoted type first, as cat then minus does
    for t in values:
        n = t.numel()
        torch.sub(t.detach().reshape(-1).to(dtype), base[start:start + n], out=out[start:start + n])
        start += n
    return out


def flatten(tensors: Params | list[torch.Tensor] | tuple[torch.Tensor, ...], clients: bool = False) -> torch.Tensor:
    """Tensors (a parameter dict, or a list such as gradients) concatenated into one detached vector;
    ``clients``: each tensor has a leading client dimension, and the result is one row per client."""
    values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    if clients:
        return torch.cat([t.detach().reshape(t.shape[0], -1) for t in values], dim=1)
    return torch.cat([t.detach().reshape(-1) for t in values])


def row_block(vectors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The k x P float32 CPU tensor whose rows 0..k-1 are ``vectors``, in order, as a view of their one storage (a
    vectorized cohort's updates are the rows of one result), or None when they are not such rows."""
    if not vectors or vectors[0].dim() != 1 or vectors[0].device.type != "cpu":
        return None
    first = vectors[0]  # its dtype and stride are checked with every other row's below
    size, storage = first.numel(), first.untyped_storage().data_ptr()
    start, step = first.data_ptr(), size * first.element_size()
    for j, v in enumerate(vectors):  # one storage: rows at consecutive addresses of another would read past it
        if v.data_ptr() != start + j * step or v.shape != first.shape or v.stride() != (1,) or \
                v.dtype != torch.float32 or v.untyped_storage().data_ptr() != storage:
            return None
    return first.as_strided((len(vectors), size), (size, 1))


def readonly_tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over ``values`` without a copy, even when they are read-only (a mean or rows read from Ray's object
    store); for readers only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(values)
