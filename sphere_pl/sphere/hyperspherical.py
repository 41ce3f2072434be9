"""Hyperspherical energy of weight matrices and the SPHERE projection (SPEC sections 2, 3).

Weights are in `nn.Linear` layout (d_out x d_in); each row is a neuron, and what matters
here is only the direction of each row, i.e. the row-normalised matrix Ŵ. Edited matrices
are large (LLaMA3 down_proj: 4096 x 14336), so nothing below makes a float64 copy of a
whole weight: float64 work is done one column chunk at a time, and the only full-size
float64 buffer is the N x N Gram matrix (N = d_out).
"""

from __future__ import annotations

import torch

from ..errors import SettingsError

DEFAULT_CHUNK_SIZE = 1024
_DIST2_EPS = 1e-12  # squared distances are clamped here so coincident rows stay finite


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out x d_in), got shape {tuple(weight.shape)}")


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise SettingsError(f"chunk_size must be >= 1, got {chunk_size}")


def _column_chunks(weight: torch.Tensor, chunk_size: int):
    """Yield float64 copies of W[:, c] for consecutive column chunks c (N x chunk each)."""
    for start in range(0, weight.shape[1], chunk_size):
        yield weight[:, start : start + chunk_size].double()


def _check_no_zero_rows(norms: torch.Tensor) -> None:
    bad = (norms == 0) | ~torch.isfinite(norms)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{int(bad.sum())} row(s) have zero or non-finite norm (e.g. rows {rows}); "
            "their direction on the hypersphere is undefined"
        )


def row_norms(weight: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Float64 Euclidean norm of every row, accumulated over column chunks.

    Chunking keeps float64 accuracy for half/float32 weights without a full float64 copy.
    """
    _check_weight(weight)
    _check_chunk_size(chunk_size)
    sq = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    for block in _column_chunks(weight, chunk_size):
        sq += block.square().sum(dim=1)
    return sq.sqrt()


def normalized_gram(weight: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Ŵ Ŵᵀ (N x N, float64): the cosines between all pairs of neurons.

    Everything in section 2 and the N x N route of section 3 needs only this matrix.
    It is accumulated as G += W[:, c] W[:, c]ᵀ in float64 over column chunks, so peak extra
    memory is the N x N buffer plus one N x chunk block. The row norms come for free
    from the diagonal of the unnormalised G. Raises ValueError for zero rows.
    """
    _check_weight(weight)
    _check_chunk_size(chunk_size)
    n = weight.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=weight.device)
    for block in _column_chunks(weight, chunk_size):
        gram.addmm_(block, block.T)
    norms = gram.diagonal().sqrt()  # a fresh tensor, not a view, so it survives the division
    _check_no_zero_rows(norms)
    gram /= norms[:, None]
    gram /= norms[None, :]
    return gram


def hyperspherical_energy(
    weight: torch.Tensor,
    s: float = 1.0,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    normalize_rows: bool = True,
) -> torch.Tensor:
    """HE_s(W): mean (or sum) over ordered pairs i != j of f_s(||ŵ_i − ŵ_j||).

    f_s(z) = z^(−s) for s > 0 and log(1/z) for s = 0 (SPEC section 2). Distances come from
    the Gram matrix, ||ŵ_i − ŵ_j||² = 2 − 2 ŵ_i·ŵ_j, clamped at 1e-12 so that (nearly)
    coincident rows give a large but finite energy. The pairwise part runs over blocks of
    `chunk_size` Gram rows so that no further N x N temporaries are created.
    `normalize_rows=False` uses the raw rows instead, ||w_i − w_j||² = G_ii + G_jj − 2 G_ij
    (an energy that also moves when neurons only change length; not the paper's definition).
    Returns a float64 scalar tensor on the weight's device.
    """
    if s < 0:
        raise SettingsError(f"s must be >= 0, got {s}")
    if reduction not in ("mean", "sum"):
        raise SettingsError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    _check_weight(weight)
    n = weight.shape[0]
    if n < 2:
        raise ValueError(f"hyperspherical energy needs at least 2 rows, got {n}")
    if normalize_rows:
        gram = normalized_gram(weight, chunk_size)
    else:
        _check_chunk_size(chunk_size)
        gram = torch.zeros(n, n, dtype=torch.float64, device=weight.device)
        for block in _column_chunks(weight, chunk_size):
            gram.addmm_(block, block.T)
        squares = gram.diagonal().clone()

    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if normalize_rows:
            dist2 = (2.0 - 2.0 * gram[start:stop]).clamp_(min=_DIST2_EPS)
        else:
            dist2 = (squares[start:stop, None] + squares[None, :] - 2.0 * gram[start:stop]).clamp_(min=_DIST2_EPS)
        if s == 0:
            energy = dist2.log_().mul_(-0.5)  # log(1/z) = -log(z²)/2
        else:
            energy = dist2.pow_(-0.5 * s)  # z^(-s) = (z²)^(-s/2)
        rows = torch.arange(stop - start, device=weight.device)
        energy[rows, rows + start] = 0.0  # drop the i == j terms
        total += energy.sum()
    if reduction == "mean":
        total /= n * (n - 1)
    return total


def _ratio_rank(eigenvalues: torch.Tensor, cumulative_ratio: float) -> int:
    """r = #{k : cumsum_k / total <= η} + 1 (reference code), eigenvalues descending."""
    ratios = eigenvalues.cumsum(0) / eigenvalues.sum()
    return int((ratios <= cumulative_ratio).sum()) + 1


def _normalized_second_moment(weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """C = ÂᵀÂ / d_out (d_in x d_in, float64), accumulated over row chunks; for d_in <= d_out."""
    norms = row_norms(weight, chunk_size)
    _check_no_zero_rows(norms)
    d_out, d_in = weight.shape
    second_moment = torch.zeros(d_in, d_in, dtype=torch.float64, device=weight.device)
    for start in range(0, d_out, chunk_size):
        block = weight[start : start + chunk_size].double() / norms[start : start + chunk_size, None]
        second_moment.addmm_(block.T, block)
    return second_moment / d_out


def principal_directions(
    weight: torch.Tensor, cumulative_ratio: float, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Top-r eigenvectors U (d_in x r) of C = ÂᵀÂ / d_out, Â = row-normalised weight.

    These are the principal hyperspherical directions that SPHERE keeps updates away from
    (SPEC section 3); r is the smallest count whose eigenvalues hold more than a fraction
    η = `cumulative_ratio` of the total. η <= 0 disables the projection: the result is
    then d_in x 0. Eigenvalues below N·eps·λ_max are numerical noise and never selected.

    The d_in x d_in matrix C is never built when d_in > d_out: the N x N Gram ÂÂᵀ has the
    same non-zero eigenvalues (times d_out), and its eigenvectors v map to those of C by
    u = Âᵀv / sqrt(λ). Returned in float64 for float64 weights and in float32 otherwise
    (half precision would spoil orthonormality), on the weight's device.
    """
    _check_weight(weight)
    _check_chunk_size(chunk_size)
    d_out, d_in = weight.shape
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if cumulative_ratio <= 0:
        return torch.zeros(d_in, 0, dtype=out_dtype, device=weight.device)

    if d_in > d_out:
        eigenvalues, eigenvectors = torch.linalg.eigh(normalized_gram(weight, chunk_size))
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(_normalized_second_moment(weight, chunk_size))
    eigenvalues = eigenvalues.flip(0).clamp(min=0)  # descending; tiny negatives are noise
    eigenvectors = eigenvectors.flip(1)

    tol = eigenvalues[0] * max(d_out, d_in) * torch.finfo(torch.float64).eps
    rank = int((eigenvalues > tol).sum())
    r = min(_ratio_rank(eigenvalues, cumulative_ratio), rank)
    if d_in <= d_out:
        return eigenvectors[:, :r].to(out_dtype)

    # U_r = Âᵀ V_r S_r⁻¹ = Wᵀ (diag(1/‖w_i‖) V_r S_r⁻¹), S_r = sqrt(λ_r); Wᵀ applied by chunks.
    coef = eigenvectors[:, :r] / eigenvalues[:r].sqrt()
    coef /= row_norms(weight, chunk_size)[:, None]
    directions = torch.empty(d_in, r, dtype=out_dtype, device=weight.device)
    start = 0
    for block in _column_chunks(weight, chunk_size):
        directions[start : start + block.shape[1]] = block.T @ coef
        start += block.shape[1]
    return directions


def sphere_project(delta: torch.Tensor, directions: torch.Tensor, strength: float) -> torch.Tensor:
    """ΔW' = ΔW − α (ΔW U) Uᵀ = ΔW (I − α U Uᵀ)ᵀ: damp the update along the principal directions.

    The component of every row of ΔW in span(U) is scaled by (1 − α), the rest is untouched,
    and the d_in x d_in projector is never formed. Computed in float32 or better, returned in
    delta's dtype on delta's device. With an empty U (projection disabled) `delta` itself is
    returned.
    """
    if delta.dim() != 2 or directions.dim() != 2:
        raise ValueError(
            "expected 2-D delta and directions, got shapes "
            f"{tuple(delta.shape)} and {tuple(directions.shape)}"
        )
    if directions.shape[0] != delta.shape[1]:
        raise ValueError(
            f"directions have {directions.shape[0]} rows but delta has d_in = {delta.shape[1]} "
            f"(delta {tuple(delta.shape)}, directions {tuple(directions.shape)})"
        )
    if directions.shape[1] == 0:
        return delta
    dtype = torch.promote_types(torch.promote_types(delta.dtype, directions.dtype), torch.float32)
    d = delta.to(dtype)
    u = directions.to(device=delta.device, dtype=dtype)
    projected = d - strength * ((d @ u) @ u.T)
    return projected.to(delta.dtype)
