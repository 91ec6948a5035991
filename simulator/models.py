"""Models: the built-in MLP, LEAF's FEMNIST CNN and Shakespeare LSTM, users' own ``torch.nn.Module``
factories (``simulator.plugins``), and the stacked forward pass of plain MLPs.

``model.name`` picks the architecture (a ``model.factory`` takes precedence): ``"mlp"`` (ReLU layers
of ``model.hidden``), ``"femnist_cnn"`` and ``"shakespeare_lstm"``, the two neural baselines of LEAF
(Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings", Sec. 4 and its reference code).

Flat parameter vectors are ``simulator.params``. Initial weights come from a seeded torch generator
state, never from the global RNG's current state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from simulator.config.schema import ConfigError, ModelConfig
from simulator.plugins import call_factory
from simulator.rng import torch_seed


def mlp(input_dim: int, output_dim: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


#: LEAF's FEMNIST images are 28 x 28 grey levels, flattened
FEMNIST_SIDE = 28
#: LEAF's Shakespeare character vocabulary (its ``ALL_LETTERS`` has 80 characters)
SHAKESPEARE_VOCAB = 80


def femnist_cnn(input_dim: int, output_dim: int) -> nn.Module:
    """LEAF's FEMNIST CNN (Caldas et al. 2018): flat (batch, 784) inputs seen as (batch, 1, 28, 28);
    conv 5x5, 32 channels ("same" padding 2), ReLU, max-pool 2; conv 5x5, 64 channels, ReLU, max-pool 2;
    dense 2048, ReLU; dense ``output_dim`` logits. 6,603,710 parameters for FEMNIST's 62 classes."""
    if input_dim != FEMNIST_SIDE * FEMNIST_SIDE:
        raise ConfigError(f"model.name = \"femnist_cnn\" takes 28x28 images (input_dim {FEMNIST_SIDE ** 2}), "
                          f"but the data has input_dim {input_dim}; use model.name = \"mlp\" for this dataset")
    return nn.Sequential(
        nn.Unflatten(1, (1, FEMNIST_SIDE, FEMNIST_SIDE)),
        nn.Conv2d(1, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (FEMNIST_SIDE // 4) ** 2, 2048), nn.ReLU(),
        nn.Linear(2048, output_dim),
    )


class ShakespeareLSTM(nn.Module):
    """LEAF's Shakespeare next-character model (Caldas et al. 2018): int64 character ids
    (batch, seq_len) -> embedding(80, 8) -> two stacked LSTM layers of 256 units (batch_first) ->
    dense ``output_dim`` logits from the last time step. PyTorch's LSTM keeps two bias vectors per
    layer (TensorFlow's one), so it has 819,920 parameters for 80 outputs (LEAF's TF model 817,872)."""

    def __init__(self, output_dim: int, vocab: int = SHAKESPEARE_VOCAB, embed: int = 8, hidden: int = 256,
                 layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(x))
        return self.out(h[:, -1])


#: the built-in architectures ``model.name`` can name: ``(cfg, input_dim, output_dim) -> nn.Module``
MODELS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "mlp": lambda cfg, i, o: mlp(i, o, cfg.hidden),
    "femnist_cnn": lambda cfg, i, o: femnist_cnn(i, o),
    "shakespeare_lstm": lambda cfg, i, o: ShakespeareLSTM(o),
}


def build_model(cfg: ModelConfig, input_dim: int, output_dim: int, seed: int) -> nn.Module:
    """Build the model with weights drawn from the run seed (purpose "init").

    ``cfg.factory`` when set, else the architecture ``cfg.name`` (a key of ``MODELS``). A factory is called
    as ``factory(input_dim=..., output_dim=...)`` when it takes those arguments, else with none; it must
    return a ``torch.nn.Module``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "init"))
        if cfg.factory:
            model = call_factory("model.factory", cfg.factory, input_dim=input_dim, output_dim=output_dim)
            if not isinstance(model, nn.Module):
                raise ConfigError(f"model.factory = {cfg.factory!r} returned {type(model).__name__}, "
                                  "not a torch.nn.Module; return the module instance")
        else:
            model = MODELS[cfg.name](cfg, input_dim, output_dim)
    return model


#: stateless elementwise modules a stacked forward can apply to a (clients, batch, features) tensor as is
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity)

StackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

#: a plain MLP's layers in order: ``(weight name, bias name or None)`` for an ``nn.Linear``, else the
#: elementwise module itself
MLPLayers = list[tuple[str, str | None] | nn.Module]


def mlp_layers(model: nn.Module) -> MLPLayers | None:
    """The layers of an ``nn.Sequential`` of ``nn.Linear`` layers and stateless elementwise activations (the
    built-in MLP and factories like it), or None for any other model."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    layers: MLPLayers = []
    for name, module in model.named_children():
        if type(module) is nn.Linear:
            layers.append((f"{name}.weight", f"{name}.bias" if module.bias is not None else None))
        elif type(module) in _ELEMENTWISE:
            layers.append(module)
        else:
            return None
    return layers


def stacked_forward(model: nn.Module) -> StackedForward | None:
    """For a plain MLP (``mlp_layers``): the forward pass of k clients at once, ``f(params, x)`` with every
    parameter stacked along a leading client dimension (k x out x in) and ``x`` of shape (k, batch, in).

    Each ``nn.Linear`` becomes one ``torch.baddbmm``: the same products a per-client ``vmap`` of
    ``functional_call`` computes, without its per-call dispatch (a transposed weight, then a separate
    bias add per layer), which dominates for small layers. Client j's outputs depend only on its own
    slice, so the gradient of a sum of client losses with respect to the stacked parameters is each
    client's own gradient. None for any other model:
    the caller then vmaps ``functional_call``."""
    layers = mlp_layers(model)
    if layers is None:
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in layers:
            if isinstance(layer, tuple):
                w, b = params[layer[0]].transpose(1, 2), layer[1]
                h = torch.bmm(h, w) if b is None else torch.baddbmm(params[b].unsqueeze(1), h, w)
            else:
                h = layer(h)
        return h

    return forward


def check_output_shape(model: nn.Module, input_dim: int, output_dim: int,
                       input_dtype: torch.dtype = torch.float32) -> None:
    """Reject a model whose output does not fit the data, before any run directory is written.

    The probe is a batch of 2 zero inputs of the data's ``input_dtype`` (int64 character ids for
    Shakespeare, float32 features otherwise)."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, input_dim, dtype=input_dtype))
    except Exception as exc:
        dtype = str(input_dtype).removeprefix("torch.")
        raise ConfigError(f"the model cannot take {dtype} inputs of shape (batch, {input_dim}) from the data: "
                          f"{type(exc).__name__}: {exc}; fix model.name, model.hidden or model.factory") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, output_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model outputs {shape} for a batch of 2, the data needs (2, {output_dim}); "
                          "fix model.factory's output layer")
    if not list(model.parameters()):
        raise ConfigError("the model has no trainable parameters; fix model.factory")
