"""HQQ-style refinement of the round-to-nearest grid, with no calibration data.

Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models": the grid parameters are chosen to
minimise an l_p norm (p < 1) of the weight error, which tolerates the few large errors of outlier weights instead of
letting them set the grid. Half-quadratic splitting adds an auxiliary error E and alternates two easy steps:
  E <- shrink_p(W - dq(q), beta)       (the l_p proximal step: sign(x) * max(|x| - |x|^(p-1) / beta, 0))
  grid <- least squares fit of W - E   (closed form per group), and beta <- kappa * beta.
HQQ itself fits a float zero point with the scale fixed. The formats infopt writes store integer zero points, so
here each step fits the scale and zero of (q - z) * s to W - E, rounds z to an integer and refits s for it; the
result is an ordinary integer grid every format and kernel reads. Each group keeps the iterate with the smallest
l_p error, so the result is never worse than round to nearest by that measure. Defaults are HQQ's reference values
(p = 0.7, beta = 10, kappa = 1.01, 20 iterations; hqq/core/optimize.py, optimize_weights_proximal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infopt.quant.methods import INTEGER, IntegerScheme, Method, option
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import QuantizedWeight, Storage


@dataclass(frozen=True, kw_only=True)
class HQQConfig(IntegerScheme):
    symmetric: bool = option(False, "--sym/--asym", "Symmetric (no zero point) or asymmetric (default for hqq).")
    iterations: int = option(20, "--hqq-iterations", "Half-quadratic iterations per weight.", minimum=1)
    lp_norm: float = option(0.7, "--hqq-lp-norm", "p of the l_p error norm minimised (p < 1 tolerates outliers).",
                            minimum=0.1, maximum=1.0)
    beta: float = option(10.0, "--hqq-beta", "Initial half-quadratic penalty.", minimum=1e-6)
    kappa: float = option(1.01, "--hqq-kappa", "Growth of the penalty per iteration.", minimum=1.0)


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(p - 1) / beta)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp_(spec.qmin, spec.qmax)


def _lp_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, p: float) -> torch.Tensor:
    return (w - (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).abs().pow(p).sum(-1)


def hqq_quantize(weight: torch.Tensor, spec: QuantSpec, storage: Storage, config: HQQConfig) -> QuantizedWeight:
    start = quantize_rtn(weight, spec, storage)
    dtype = start.scale.dtype
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, spec.num_groups(in_f), -1)
    scale = start.scale.float()
    zero = start.zero.float() if start.zero is not None else torch.zeros_like(scale)
    lowest = spec.qmin + storage.min_zero_offset
    best_scale, best_zero = scale, zero
    best = _lp_error(w, _codes(w, scale, zero, spec), scale, zero, config.lp_norm)
    beta = config.beta
    for _ in range(config.iterations):
        q = _codes(w, scale, zero, spec)
        target = w - _shrink(w - (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1), beta, config.lp_norm)
        if not spec.symmetric:
            q_mean, t_mean = q.mean(-1), target.mean(-1)
            slope = ((q - q_mean.unsqueeze(-1)) * (target - t_mean.unsqueeze(-1))).sum(-1)
            slope = slope / (q - q_mean.unsqueeze(-1)).pow(2).sum(-1).clamp_min(1e-12)
            fitted = torch.round(q_mean - t_mean / torch.where(slope > 0, slope, scale))
            zero = torch.where(slope > 0, fitted, zero).clamp(lowest, spec.qmax)
        levels = q - zero.unsqueeze(-1)
        refit = (levels * target).sum(-1) / levels.pow(2).sum(-1).clamp_min(1e-12)
        refit = refit.to(dtype).float()  # the scale the file will hold
        scale = torch.where(torch.isfinite(refit) & (refit > 0), refit, scale)
        beta *= config.kappa
        error = _lp_error(w, _codes(w, scale, zero, spec), scale, zero, config.lp_norm)
        better = error < best
        best = torch.where(better, error, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    codes = _codes(w, best_scale, best_zero, spec).to(torch.int8).reshape(out_f, in_f)
    zero_out = None if spec.symmetric else best_zero.to(torch.int8)
    return QuantizedWeight(codes, best_scale.to(dtype), zero_out, spec)


class HQQQuantizer:
    def __init__(self, config: HQQConfig, storage: Storage):
        self.config, self.storage = config, storage

    def quantize_weight(self, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return hqq_quantize(weight, spec, self.storage, self.config)


METHOD = Method("hqq", "HQQ-style half-quadratic refinement of the RTN grid (no calibration)", HQQConfig, INTEGER,
                "compressed-tensors", calibrated=False, factory=lambda config, storage, adapter: HQQQuantizer(config, storage))
