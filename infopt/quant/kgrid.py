"""The K-quant grid (ggml's Q4_K): super-blocks of 256 values in 8 sub-blocks of 32, each sub-block with a step and
an offset that are 6-bit multiples of two fp16 super-scales: x = (d * sc) * q - (dmin * mn), q in 0..15.

A grid a method can quantize against (GPTQ on the grid stores exactly what it optimized), and the rounding the
GGUF writer uses from full precision. The fitting is infopt's own: weighted least squares over candidate roundings
for each sub-block, then the 6-bit rounding of the sub-block scales and mins under their super-scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER = 256
SUB = 32
# A later candidate of a scale search replaces the best only when better by more than 1e-12 relative: exact fits tie
# (every candidate fits a constant block), and the torch and C++ forms, summing in different orders, would break such
# ties differently. Summation order moves a float64 sum of 16-32 same-signed terms by ~1e-15 at most.
BETTER = 1.0 + 1e-12
WORSE = 1.0 - 1e-12
# The 2x2 least-squares system of an affine fit is singular when every code of a block is the same (a constant
# block); its determinant then comes out as summation noise of either sign, so below this fraction of sw * sqq it
# counts as zero (a real spread of codes gives 1e-5 or more).
SINGULAR = 1e-12
# An error must also improve by this fraction of the block's weighted energy sum w x^2: exact fits (a constant block)
# leave errors of ~1e-32 of it, pure rounding noise, which would otherwise pick among equally exact candidates.
FLOOR = 1e-15


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ggml's nearest_int for the values it sees): halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def search_kernels(x: torch.Tensor):
    """The C++ block searches (runtime/kernels/grid_search.cpp) for float32 CPU blocks, or None for the torch form."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % 16 or x.shape[1] > 256:
        return None
    from infopt.runtime.kernels import build  # noqa: PLC0415 (builds the extension on first use)

    return build.ops()


def affine_search(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20,
                  nonnegative_min: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, min) per block for x = scale * q - min, q in [0, nmax], by weighted least squares over candidate
    roundings. The K-quant grids store a non-negative min (nonnegative_min); Q4_1/Q5_1 store any. Sums in float64;
    the C++ form (affine_scale_search) computes the same, step for step, where the extension is built."""
    kernels = search_kernels(x)
    if kernels is not None:
        return kernels.affine_scale_search(x.contiguous(), w.to(torch.float32).contiguous(), nmax, steps,
                                           nonnegative_min)
    lo = x.min(dim=1, keepdim=True).values
    lo = lo.clamp_max(0) if nonnegative_min else lo
    hi = x.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-30)
    x64, w64 = x.double(), w.double()
    best_scale, best_min = span.double() / nmax, -lo.double()
    best_err = torch.full_like(best_scale, float("inf"))
    sw, sx = w64.sum(dim=1, keepdim=True), (w64 * x64).sum(dim=1, keepdim=True)
    margin = FLOOR * (w64 * x64 * x64).sum(dim=1, keepdim=True)
    inverse = span.reciprocal()
    for step in range(steps + 1):
        iscale = inverse * (nmax - 1.0 + 0.1 * step)
        q = torch.clamp(round_half_away((x - lo) * iscale), 0, nmax).double()
        # minimize sum w (scale q - min' - x)^2 over scale and min'; min' = -offset
        wq = w64 * q
        sq, sqq, sqx = wq.sum(1, keepdim=True), (wq * q).sum(1, keepdim=True), (wq * x64).sum(1, keepdim=True)
        det = sw * sqq - sq * sq
        solvable = det > SINGULAR * (sw * sqq)
        scale = torch.where(solvable, (sw * sqx - sq * sx) / det.clamp_min(1e-30), best_scale)
        offset = torch.where(solvable, (sqq * sx - sq * sqx) / det.clamp_min(1e-30), lo.double())
        if nonnegative_min:  # x = scale q - min with min = -offset >= 0
            offset = offset.clamp_max(0)
            scale = torch.where(offset == 0, sqx / sqq.clamp_min(1e-30), scale)
        scale = scale.clamp_min(0)
        err = (w64 * (scale * q + offset - x64).pow(2)).sum(dim=1, keepdim=True)
        better = err < best_err * WORSE - margin
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, -offset, best_min)
    return best_scale.float(), best_min.float()


def importance_weights(x: torch.Tensor, imatrix: torch.Tensor | None, size: int) -> torch.Tensor:
    """The importance weights of [rows * cols / size, size] blocks of x, tiling the per-column imatrix."""
    squares = x.pow(2)
    w = (squares.mean(dim=1, keepdim=True) + squares).sqrt_()
    if imatrix is not None:
        w = w * imatrix.reshape(-1, size).repeat(x.shape[0] // (imatrix.numel() // size), 1)
    return w


def super_scales(scale: torch.Tensor, minimum: torch.Tensor):
    """Sub-block scales and mins [n, 8] -> their 6-bit codes under fp16 super-scales d, dmin (ggml's Q4_K/Q5_K
    grid: sc = round(63 * scale / max scale))."""
    max_scale = scale.amax(dim=1, keepdim=True)
    max_min = minimum.amax(dim=1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp_min(1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp_min(1e-30), torch.zeros_like(max_min))
    sc = torch.clamp(round_half_away(inv_scale * scale), 0, 63)
    mn = torch.clamp(round_half_away(inv_min * minimum), 0, 63)
    d = (max_scale / 63).to(torch.float16).to(torch.float32)
    dmin = (max_min / 63).to(torch.float16).to(torch.float32)
    return sc, mn, d, dmin


def grid_codes(x: torch.Tensor, d, dmin, sc, mn, nmax: int) -> torch.Tensor:
    """Codes of x [rows, cols] on a K-quant grid given its stored super-scales and 6-bit sub-scales: every value is
    rounded against exactly the step and offset the file will hold."""
    rows, cols = x.shape
    step = (d.reshape(-1, 1) * sc.reshape(-1, 8)).reshape(-1, 1)
    offset = (dmin.reshape(-1, 1) * mn.reshape(-1, 8)).reshape(-1, 1)
    sub = x.to(torch.float32).reshape(-1, SUB)
    inv = torch.where(step == 0, torch.zeros_like(step), 1 / step)
    return torch.clamp(round_half_away((sub + offset) * inv), 0, nmax).reshape(rows, cols)


def fit(x: torch.Tensor, nmax: int = 15, imatrix: torch.Tensor | None = None):
    """(sc, mn, d, dmin) of x [rows, cols] (cols a multiple of 256): per super-block d, dmin [rows * cols/256, 1],
    per sub-block sc, mn [rows * cols/256, 8]."""
    sub = x.to(torch.float32).reshape(-1, SUB)
    scale, minimum = affine_search(sub, importance_weights(sub, imatrix, SUB), nmax)
    return super_scales(scale.reshape(-1, 8), minimum.reshape(-1, 8))


def round_to_grid(x: torch.Tensor, nmax: int = 15) -> "KGridWeight":
    """x [rows, cols] (cols a multiple of 256) rounded to its fitted K-quant grid, as the GGUF writer rounds it."""
    rows, cols = x.shape
    sc, mn, d, dmin = fit(x, nmax)
    codes = grid_codes(x, d, dmin, sc, mn, nmax)
    supers = cols // SUPER
    return KGridWeight(codes.to(torch.uint8).cpu(), d.reshape(rows, supers).cpu(), dmin.reshape(rows, supers).cpu(),
                       sc.reshape(rows, supers, 8).to(torch.uint8).cpu(),
                       mn.reshape(rows, supers, 8).to(torch.uint8).cpu(),
                       nmax)


@dataclass
class KGridWeight:
    """A weight on the K-quant grid: codes 0..nmax and the grid's stored scales, as the file holds them."""

    codes: torch.Tensor  # uint8 [out, in]
    d: torch.Tensor  # fp32 (fp16-exact) [out, in / 256]
    dmin: torch.Tensor  # fp32 (fp16-exact) [out, in / 256]
    sc: torch.Tensor  # uint8 [out, in / 256, 8]
    mn: torch.Tensor  # uint8 [out, in / 256, 8]
    nmax: int = 15

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block step and offset, [out, in / 32]."""
        rows = self.codes.shape[0]
        step = (self.d.unsqueeze(-1) * self.sc.to(torch.float32)).reshape(rows, -1)
        offset = (self.dmin.unsqueeze(-1) * self.mn.to(torch.float32)).reshape(rows, -1)
        return step, offset

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        step, offset = self.steps()
        q = self.codes.to(torch.float32).reshape(rows, -1, SUB)
        return (step.unsqueeze(-1) * q - offset.unsqueeze(-1)).reshape(rows, cols)
