"""Flag Aggregator: a robust subspace of the updates' directions, by iteratively reweighted PCA.

Reference: Almasi, Mishra, Vamanan, Ravi, "Flag Aggregator: Scalable Distributed Training under
Failures and Augmented Losses using Convex Optimization", ICLR 2024, arXiv:2302.05865.
"""

from __future__ import annotations

import torch

from gossamer.aggregators.base import (
    as_float,
    as_int,
    check_n,
    finish,
    median,
    prepare,
    rule,
    weighted_sum,
)


def check_flag(
    n, *, f: int = 0, m: int = 1, lam: float = 0.0, iters: int = 20, eps: float = 1e-10,
    tol: float = 1e-9,
) -> None:
    check_n(n)
    as_int("f", f, lo=0)
    as_int("m", m, lo=1)
    as_float("lam", lam)
    as_int("iters", iters, lo=0)
    as_float("eps", eps, positive=True)
    as_float("tol", tol)


def _residuals(cols: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``|u|^2 - |Y^T u|^2`` for every column ``u`` of ``cols [G, K, k]``, ``Y = basis [G, k, m]``."""
    inside = torch.bmm(cols, basis).square().sum(dim=2)
    return (cols.square().sum(dim=2) - inside).clamp_min(0.0)


def _top_subspace(cols: torch.Tensor, a: torch.Tensor, m: int) -> torch.Tensor:
    """Top-``m`` eigenvectors ``[G, k, m]`` of ``sum_K a_K u_K u_K^T``."""
    mat = torch.bmm(cols.transpose(1, 2) * a[:, None, :], cols)
    return torch.linalg.eigh((mat + mat.transpose(1, 2)) / 2).eigenvectors[:, :, -m:]


@rule("flag", check_flag)
def flag(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    m: int = 1,
    lam: float = 0.0,
    iters: int = 20,
    eps: float = 1e-10,
    tol: float = 1e-9,
) -> torch.Tensor:
    r"""Flag Aggregator (Almasi et al., ICLR 2024, arXiv:2302.05865); ignores ``f``.

    Objective, per group. Let ``v_i = x_i / |x_i|`` be the rows' directions (0 for a zero row),
    ``w`` the weights normalised to sum 1, ``omega_i = B w_i`` (1 for uniform weights), and for
    pairs ``i < j`` let ``d_ij = (v_i - v_j) / |v_i - v_j|`` (0 when equal) with pair weights
    ``pi_ij = w_i w_j / sum_{k<l} w_k w_l``. With ``r_Y(u) = |u|^2 - |Y^T u|^2`` (for a unit
    ``u``, the squared sine of its angle to ``span(Y)``; ``1 - r`` is then the squared
    reconstruction ratio ``|Y^T u|^2 / |u|^2``), find

        min over Y in R^{P x m}, Y^T Y = I of
            sum_i omega_i sqrt(r_Y(v_i) + eps) + lam * sum_{i<j} pi_ij sqrt(r_Y(d_ij) + eps).

    The paper models each worker's reconstruction ratio with Beta densities and solves the
    regularized log-likelihood over the subspace approximately by iterative least squares;
    the authors' code minimizes this sum of sines (FlagIRLS with "sine" weights: with
    ``lam = 0``, the flag median of the lines the updates span) plus ``lam`` times the
    pairwise terms, averaged over pairs (``lambda / (p (p - 1)) sum_{i != j}`` there, which is
    the uniform-weight case here).

    Solver: iteratively reweighted least squares, a majorize-minimize step that never raises
    the objective: with ``a_u = (weight of u) / sqrt(r_Y(u) + eps)``, ``Y`` becomes the top-``m``
    eigenvectors of ``sum_u a_u u u^T`` (a weighted flag mean). Start from all residuals equal
    (the plain flag mean); stop after ``iters`` steps or once the relative decrease is at most
    ``tol``. The work runs in the ``min(B, P)``-dimensional span of the rows (one reduced QR
    of the directions, ``O(B^2 P)``); ``m`` is capped at that dimension.

    Output: ``Y Y^T sum_i w_i c_i v_i`` with ``c_i = min(|x_i|, median_j |x_j|)``: the weighted
    mean of the rows, each clipped to the median row norm, projected on the subspace.

    Differences from the authors' code (hamidralmasi/FlagAggregator), documented choices:
    they normalise the gradients and return ``(1/m) sum_i Y Y^T v_i``, which carries no
    magnitude; here the median-norm clipping gives the scale, so identical rows return that row
    and a huge row adds at most its weight times the median norm to the projected mean. They start
    from a random point; here the start is deterministic. Their pairwise term is
    ``|1 - |Y^T (v_i - v_j)|^2|`` on unnormalised differences; here differences are normalised
    so every term is a squared sine in ``[0, 1]``. The paper aggregates gradients: feed updates
    (model differences) rather than full models for the closest match.

    Args:
        updates: ``[B, P]`` or ``[G, B, P]``.
        weights: ``[B]`` or ``[G, B]``, e.g. sample counts; uniform when None.
        m: subspace dimension (the authors' ``r_col``, default 1).
        lam: weight of the pairwise terms (the authors' ``lambda_``, default 0).
        iters, eps, tol: IRLS steps, smoothing, relative-decrease stopping tolerance.
    """
    x, w, batched = prepare(updates, weights)
    g, n, p = x.shape
    check_flag(n, f=f, m=m, lam=lam, iters=iters, eps=eps, tol=tol)
    norms = x.norm(dim=2)                                              # [G, B]
    clipped = torch.minimum(norms, median(norms, dim=1)[:, None])
    v = x / torch.where(norms > 0, norms, torch.ones_like(norms))[:, :, None]
    q, r = torch.linalg.qr(v.transpose(1, 2))        # v^T = q r, q [G, P, k] orthonormal
    z = r.transpose(1, 2)                             # coordinates of the rows [G, B, k]
    k = z.shape[2]
    cols, base = z, w * n
    if lam > 0 and n > 1:
        i, j = torch.triu_indices(n, n, 1, device=x.device)
        d = z[:, i] - z[:, j]
        dn = d.norm(dim=2, keepdim=True)
        d = torch.where(dn > 1e-12, d / torch.where(dn > 1e-12, dn, torch.ones_like(dn)), 0.0)
        pw = w[:, i] * w[:, j]
        cols = torch.cat([z, d], dim=1)
        base = torch.cat([base, lam * pw / pw.sum(dim=1, keepdim=True).clamp_min(1e-300)], dim=1)

    def objective(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        root = (_residuals(cols, y) + eps).sqrt()
        return (base * root).sum(dim=1), root

    y = _top_subspace(cols, base, min(m, k))
    obj, root = objective(y)
    active = torch.ones(g, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        y_new = _top_subspace(cols, base / root, min(m, k))
        new, root_new = objective(y_new)
        done = (obj - new) <= tol * new
        y = torch.where(active[:, None, None], y_new, y)
        root = torch.where(active[:, None], root_new, root)
        obj = torch.where(active, new, obj)
        active = active & ~done
        if not bool(active.any()):
            break
    target = weighted_sum(w * clipped, z)                              # [G, k]
    inside = torch.bmm(y, torch.bmm(y.transpose(1, 2), target[:, :, None]))
    return finish(torch.bmm(q, inside).squeeze(2), batched, updates.dtype)
