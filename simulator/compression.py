"""Compressed client uploads: stateless, seeded encoders of an update vector, their decoders, and their sizes.

A client encodes the vector it uploads (a delta, or a meta-gradient) with ``compress``; the server decodes it
with ``decompress`` before aggregation, and the upload is charged ``encoded_bytes`` (in ``bytes_up`` and in the
simulated upload time). Every encoder is a pure function of the vector, the ``[compression]`` config and a
generator seeded from (run seed, "compress", round or refill group, client id), so compressed runs stay
bit-identical across actor counts and backends. The encodings (d values, k kept):

- ``fp16``: IEEE half precision, 2 B a value (Konecny et al. 2016, "Federated Learning: Strategies for
  Improving Communication Efficiency", Sec. 3: fewer bits per value). Values beyond 65,504 become inf, and the
  update is then rejected as non-finite.
- ``int8``: one float32 scale s = max |v_i| / 127 and round(v_i / s) in [-127, 127], 1 B a value + 4 B; each
  value is off by at most s / 2.
- ``qsgd``: QSGD with s = ``levels`` levels (Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via
  Gradient Quantization and Encoding", Sec. 3.1): Q(v_i) = ||v||_2 sgn(v_i) xi_i / s, xi_i = l + 1 with
  probability |v_i| s / ||v|| - l, else l (l = floor(|v_i| s / ||v||)): unbiased, with variance
  E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2 (Lemma 3.1). A float32 norm plus ceil(log2(s + 1)) + 1
  bits (level and sign) per value, the bit string rounded up to whole bytes (no Elias coding).
- ``randk``: k = floor(``fraction`` d) coordinates drawn uniformly without replacement, scaled by d / k so that
  the estimate is unbiased (Konecny et al. 2016, Sec. 3, "random mask"); the indices follow from a 64-bit
  seed the server shares, so k float32 values + 8 B.
- ``topk``: the k largest |v_i| (ties: the lower index), unscaled (biased); k int32 indices + k float32 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.config.schema import CompressionConfig

METHODS = ("none", "fp16", "int8", "qsgd", "randk", "topk")
INT8_MAX = 127


@dataclass(frozen=True)
class Encoded:
    """One compressed vector as it would travel: ``values`` (float16, int8 codes, signed QSGD levels or float32),
    ``indices`` (topk), ``scale`` (int8's scale, QSGD's norm; float32) and ``seed`` (randk's index stream)."""

    method: str
    size: int
    values: np.ndarray
    indices: np.ndarray | None = None
    scale: float = 0.0
    seed: int = 0
    levels: int = 0


def kept(d: int, fraction: float) -> int:
    """k of randk and topk: floor(fraction d), at least 1, ignoring float noise (0.29 x 100 keeps 29)."""
    return max(1, min(d, math.floor(fraction * d + 1e-9)))


def level_bits(levels: int) -> int:
    """Bits of one QSGD value: ceil(log2(s + 1)) for the level 0..s, plus one for the sign."""
    return math.ceil(math.log2(levels + 1)) + 1


def encoded_bytes(cfg: CompressionConfig, d: int) -> int:
    """Bytes one upload of a d-value vector takes under ``cfg`` (see the module docstring)."""
    if cfg.method == "none":
        return 4 * d
    if cfg.method == "fp16":
        return 2 * d
    if cfg.method == "int8":
        return d + 4
    if cfg.method == "qsgd":
        return 4 + math.ceil(d * level_bits(cfg.levels) / 8)
    if cfg.method == "randk":
        return 4 * kept(d, cfg.fraction) + 8
    if cfg.method == "topk":
        return 8 * kept(d, cfg.fraction)
    raise ValueError(f"unknown compression method {cfg.method!r}; choose one of {', '.join(METHODS)}")


def _randk_indices(seed: int, d: int, k: int) -> np.ndarray:
    return np.sort(np.random.Generator(np.random.PCG64(seed)).choice(d, k, replace=False))


def compress(v: np.ndarray, cfg: CompressionConfig, rng: np.random.Generator) -> Encoded:
    """Encode the float32 vector ``v`` (``rng``: the client's "compress" stream; only qsgd and randk draw)."""
    v = np.asarray(v, np.float32)
    d, m = v.size, cfg.method
    if m == "none":
        return Encoded(m, d, v.copy())
    if m == "fp16":
        return Encoded(m, d, v.astype(np.float16))
    if m == "int8":
        scale = np.float32(np.abs(v).max() / INT8_MAX) if d else np.float32(0)
        codes = np.zeros(d, np.int8) if scale == 0 else np.clip(
            np.rint(v.astype(np.float64) / float(scale)), -INT8_MAX, INT8_MAX).astype(np.int8)
        return Encoded(m, d, codes, scale=float(scale))
    if m == "qsgd":
        s = cfg.levels
        norm = float(np.float32(np.linalg.norm(v.astype(np.float64))))
        if norm == 0:
            return Encoded(m, d, np.zeros(d, np.int32), scale=0.0, levels=s)
        r = np.minimum(np.abs(v.astype(np.float64)) / norm * s, s)
        low = np.floor(r)
        level = low + (rng.random(d) < r - low)
        return Encoded(m, d, (np.sign(v) * level).astype(np.int32), scale=norm, levels=s)
    if m == "randk":
        k = kept(d, cfg.fraction)
        seed = int(rng.integers(0, 2**63))
        return Encoded(m, d, v[_randk_indices(seed, d, k)].copy(), seed=seed)
    if m == "topk":
        k = kept(d, cfg.fraction)
        idx = np.sort(np.argsort(-np.abs(v), kind="stable")[:k]).astype(np.int32)
        return Encoded(m, d, v[idx].copy(), indices=idx)
    raise ValueError(f"unknown compression method {m!r}; choose one of {', '.join(METHODS)}")


def decompress(e: Encoded) -> np.ndarray:
    """The float32 vector the server reconstructs from ``e`` (it never sees the original)."""
    if e.method in ("none", "fp16"):
        return e.values.astype(np.float32)
    if e.method == "int8":
        return (e.values.astype(np.float64) * e.scale).astype(np.float32)
    if e.method == "qsgd":
        return (e.scale * e.values.astype(np.float64) / e.levels).astype(np.float32)
    out = np.zeros(e.size, np.float32)
    if e.method == "randk":
        k = e.values.size
        out[_randk_indices(e.seed, e.size, k)] = (e.values.astype(np.float64) * (e.size / k)).astype(np.float32)
        return out
    if e.method == "topk":
        out[e.indices] = e.values
        return out
    raise ValueError(f"unknown compression method {e.method!r}; choose one of {', '.join(METHODS)}")


def roundtrip(v: np.ndarray, cfg: CompressionConfig, rng: np.random.Generator) -> np.ndarray:
    """``decompress(compress(v))``: what the server aggregates of the client's vector ``v``."""
    return decompress(compress(v, cfg, rng))
