"""PowerSGD: rank-r approximation of each weight matrix by one power iteration.

Vogels, Karimireddy, Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", arXiv:1905.13727. Per parameter ``M`` (``[n, m]``: first dim x
the rest): ``P = orthonormalize(M Q0)``, ``Q = M^T P``, receiver gets ``P Q^T``.

Stateless: ``Q0`` is drawn afresh from counter-based normals keyed by
``(seed, key, TAG_POWERSGD, parameter index, j)``. The paper's warm start (reusing the
previous round's ``Q``) would need caller-held state ``Q`` per sender and parameter and is not
done here. PowerSGD is biased; the paper runs it with error feedback
(:func:`gossamer.compression.feedback.error_feedback`).

The factors are computed in float64 and sent as float32; the receiver's ``P Q^T`` is a
fixed-order float64 sum, so payload and ``decompress`` agree to the bit on every device.
Batched matmul/QR kernels may depend on the batch size and device; computing in float64 makes
the float32 factors agree in practice (checked on CPU and an H200: bit-identical across batch
compositions and between the two), but a last-bit difference is not ruled out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gossamer.compression.base import (
    COMPRESSORS,
    TAG_POWERSGD,
    Compressor,
    Encoded,
    as_int,
    check_batch,
    row_keys,
    row_uniform,
)


def _normal(seed: int, keys: np.ndarray, param: int, count: int, device) -> torch.Tensor:
    """Standard normals ``[N, count]`` by Box-Muller from two counter-based uniforms."""
    u = row_uniform(seed, keys, TAG_POWERSGD, 2 * count, param, device=device)
    u1, u2 = 1.0 - u[:, 0::2], u[:, 1::2]  # u1 in (0, 1]: log is finite
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _outer_sum(p_factor: torch.Tensor, q_factor: torch.Tensor) -> torch.Tensor:
    """``P Q^T`` as a fixed-order sum of rank-1 terms in float64 (each product of float32s is
    exact), rounded once: bit-identical on any device and batch size, unlike a matmul."""
    out = torch.zeros(p_factor.shape[0], p_factor.shape[1], q_factor.shape[1],
                      dtype=torch.float64, device=p_factor.device)
    for j in range(p_factor.shape[2]):
        out += p_factor[:, :, j, None].double() * q_factor[:, None, :, j].double()
    return out.float()


@COMPRESSORS.register("powersgd")
class PowerSGD(Compressor):
    """Rank-``rank`` PowerSGD over a model's parameter layout ``spec`` (a ``ParamSpec``).

    A parameter of shape ``(n, *rest)`` with ``m = prod(rest)`` is factored at rank
    ``r' = min(rank, n, m)`` when that is smaller (``r' (n + m) < n m``); 1-D parameters and
    matrices too small to gain are sent raw. Wire: for each parameter in ``spec`` order,
    either its raw float32 values or ``P`` (``n x r'``, row-major) then ``Q`` (``m x r'``),
    float32; a fixed size, ``4 x`` the float count.
    """

    name = "powersgd"
    needs_spec = True

    def __init__(self, spec, rank: int = 1) -> None:
        self.spec = spec
        self.rank = as_int("rank", rank, lo=1)
        self.plan: list[tuple[int, int, int, int]] = []  # (offset, n, m, r'), r' = 0: raw
        for shape, offset in zip(spec.shapes, spec.offsets, strict=True):
            numel = math.prod(shape)
            n, m = (shape[0], numel // shape[0]) if len(shape) >= 2 and numel else (numel, 1)
            r = min(self.rank, n, m) if len(shape) >= 2 else 0
            self.plan.append((offset, n, m, r if r and r * (n + m) < n * m else 0))

    def _check_numel(self, numel: int) -> None:
        if numel != self.spec.numel:
            raise ValueError(f"powersgd was built for {self.spec.numel} parameters, got {numel}")

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        self._check_numel(x.shape[1])
        keys = row_keys(x, keys)
        parts: dict[str, torch.Tensor] = {}
        for i, (off, n, m, r) in enumerate(self.plan):
            block = x[:, off:off + n * m]
            if not r:
                parts[f"raw{i}"] = block.clone()
                continue
            # float64 so that batch- and device-dependent matmul/QR kernels round alike
            # once cast to the float32 factors that travel.
            mat = block.double().reshape(-1, n, m)
            q0 = _normal(seed, keys, i, m * r, x.device).reshape(-1, m, r)
            p_factor = torch.linalg.qr(mat @ q0).Q  # orthonormal columns, [N, n, r]
            parts[f"p{i}"] = p_factor.float()
            parts[f"q{i}"] = (mat.transpose(1, 2) @ p_factor).float()
        return Encoded(parts, np.full(x.shape[0], self.nominal_bytes(x.shape[1]),
                                      dtype=np.int64), x.shape[1])

    def decompress(self, enc):
        pieces = []
        for i, (_, n, m, r) in enumerate(self.plan):
            if not r:
                pieces.append(enc.parts[f"raw{i}"])
            else:
                pieces.append(_outer_sum(enc.parts[f"p{i}"], enc.parts[f"q{i}"]).reshape(-1, n * m))
        return torch.cat(pieces, dim=1)

    def to_bytes(self, enc, row):
        chunks = []
        for i, (_, _, _, r) in enumerate(self.plan):
            names = [f"raw{i}"] if not r else [f"p{i}", f"q{i}"]
            chunks += [enc.parts[k][row].cpu().numpy().astype("<f4").tobytes() for k in names]
        return b"".join(chunks)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        self._check_numel(numel)
        if len(data) != self.nominal_bytes(numel):
            raise ValueError(f"powersgd payload has {len(data)} bytes, expected "
                             f"{self.nominal_bytes(numel)}")
        floats = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
        parts, at = {}, 0
        for i, (_, n, m, r) in enumerate(self.plan):
            if not r:
                parts[f"raw{i}"], at = floats[at:at + n * m][None], at + n * m
            else:
                parts[f"p{i}"] = floats[at:at + n * r].reshape(1, n, r)
                parts[f"q{i}"] = floats[at + n * r:at + (n + m) * r].reshape(1, m, r)
                at += (n + m) * r
        return self.decompress(Encoded(parts, np.zeros(1, dtype=np.int64), numel))[0]

    def nominal_bytes(self, numel):
        return 4 * sum(n * m if not r else (n + m) * r for _, n, m, r in self.plan)
