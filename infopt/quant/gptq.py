"""GPTQ: quantize one linear's weight column by column, correcting later columns for each error.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1. With H = 2 X X^T over the calibration inputs and U the upper Cholesky
factor of H^-1, quantizing column i with error e_i = (w_i - q_i) / U_ii moves every later column j by
-e_i * U_ij. Columns are processed in blocks (lazy batch updates): the update of columns beyond the
current block is applied once per block as one matrix product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from infopt.errors import InfoptError
from infopt.quant import kgrid
from infopt.quant.driver import LayerContext, LayerResult
from infopt.quant.methods import INTEGER, CalibratedRun, IntegerScheme, Method, option
from infopt.quant.precision import fast_fp32_products
from infopt.quant.rtn import compute_qparams
from infopt.quant.weights import MethodRecord, QuantizedWeight, Storage
from infopt.quant.spec import QuantSpec

MAX_DAMP_RETRIES = 6


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(CalibratedRun, IntegerScheme):
    # fraction of the mean Hessian diagonal added to the diagonal
    damp: float = option(0.01, "--damp", "GPTQ dampening, a fraction of the mean Hessian diagonal.")
    block_size: int = option(128, "--gptq-block-size", "GPTQ lazy-update block (columns).", minimum=1)
    act_order: bool = option(False, "--act-order", "Quantize columns by decreasing activation (desc_act).")
    static_groups: bool = option(False, "--static-groups", "Group scales from the original weights.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            error = InfoptError(f"invalid --damp {self.damp}: use a fraction such as 0.01")
            error.field = "damp"
            raise error

    def effective(self, storage: Storage) -> "GPTQConfig":
        """Act-order where the format has no g_idx runs with static groups (the group of a column is then fixed)."""
        if self.act_order and not storage.g_idx and not self.static_groups:
            return replace(self, static_groups=True)
        return self

    def record(self, method: str, storage: Storage) -> MethodRecord:
        config = self.effective(storage)
        return MethodRecord(method=method, act_order=config.act_order, static_groups=config.static_groups,
                            damp=config.damp, true_sequential=True)


class Hessian:
    """Running H = 2/n sum_t x_t x_t^T over n input rows (tokens), kept in float32.

    H is symmetric, so each batch adds only the block upper triangle (row blocks of SYMMETRIC_BLOCK columns times
    the columns from that block on; about 3/4 of the full product's work) and matrix() mirrors it."""

    SYMMETRIC_BLOCK = 128

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        bf16_values = inputs.dtype == torch.bfloat16  # (reduced-precision forwards) upcast exactly, fast products
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.sum.device, torch.float32)
        block = self.SYMMETRIC_BLOCK
        with fast_fp32_products(self.sum.device, bf16_inputs=bf16_values):
            for i in range(0, x.shape[1], block):
                self.sum[i : i + block, i:].addmm_(x[:, i : i + block].T, x[:, i:])
        self.rows += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.rows == 0:
            raise InfoptError("no calibration inputs reached this linear")
        upper = torch.triu(self.sum)
        return (upper + upper.T - torch.diag(upper.diagonal())) * (2.0 / self.rows)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # the dampening fraction finally used (raised when H was not positive definite)
    dead_columns: int
    output_error: float  # tr(E H E^T) / tr(W H W^T), E = W - Q: relative output MSE on the calibration set
    rounded_from: torch.Tensor | None = None  # the error-corrected values each code was rounded from (keep_rounded)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, raising damp tenfold on failure."""
    mean_diag = hessian.diagonal().mean()
    for _ in range(MAX_DAMP_RETRIES):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        damp *= 10
    raise InfoptError(f"the Hessian is not positive definite even with damp {damp / 10:g}")


class _GroupParams:
    """Scale and zero point per group, filled as GPTQ reaches each group's first column."""

    fit_width = None  # columns fitted at once: the group

    def __init__(self, out_features: int, groups: int, spec: QuantSpec, dtype: torch.dtype, device,
                 min_zero_offset: int = 0):
        self.spec = spec
        self.dtype = dtype
        self.min_zero_offset = min_zero_offset
        self.scale = torch.ones(out_features, groups, dtype=dtype, device=device)
        self.zero = None if spec.symmetric else torch.zeros(out_features, groups, dtype=torch.int8, device=device)

    def fit(self, group: int, columns: torch.Tensor) -> None:
        wmin, wmax = torch.aminmax(columns, dim=1)
        scale, zero = compute_qparams(wmin, wmax, self.spec, self.dtype, self.min_zero_offset)
        self.scale[:, group] = scale
        if zero is not None:
            self.zero[:, group] = zero

    def column(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale[:, group].float()
        zero = self.zero[:, group].float() if self.zero is not None else torch.zeros_like(scale)
        return scale, zero

    def quantize(self, group: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized values) of one column on its group's grid."""
        scale, zero = self.column(group)
        q = torch.clamp(torch.round(values / scale) + zero, self.spec.qmin, self.spec.qmax)
        return q, (q - zero) * scale

    def result(self, codes: torch.Tensor, g_idx: torch.Tensor | None):
        return QuantizedWeight(codes.cpu(), self.scale.cpu(), None if self.zero is None else self.zero.cpu(),
                               self.spec, None if g_idx is None else g_idx.cpu())


class _KGridParams:
    """The K-quant grid (infopt.quant.kgrid): each super-block of 256 columns is fitted when GPTQ reaches it, from
    the columns' current (already error-corrected) values, and its 6-bit sub-block steps and offsets are the ones
    the file stores, so every column is rounded against exactly the grid that is written."""

    fit_width = kgrid.SUPER

    def __init__(self, out_features: int, in_features: int, device, nmax: int = 15):
        supers = in_features // kgrid.SUPER
        self.nmax = nmax
        self.d = torch.zeros(out_features, supers, device=device)
        self.dmin = torch.zeros(out_features, supers, device=device)
        self.sc = torch.zeros(out_features, supers, 8, device=device)
        self.mn = torch.zeros(out_features, supers, 8, device=device)

    def fit(self, index: int, columns: torch.Tensor) -> None:
        sc, mn, d, dmin = kgrid.fit(columns[:, : kgrid.SUPER], self.nmax)
        self.sc[:, index], self.mn[:, index] = sc, mn
        self.d[:, index], self.dmin[:, index] = d.reshape(-1), dmin.reshape(-1)

    def quantize(self, group: int, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, sub = divmod(group, 8)
        step = self.d[:, index] * self.sc[:, index, sub]
        offset = self.dmin[:, index] * self.mn[:, index, sub]
        inverse = torch.where(step == 0, torch.zeros_like(step), 1 / step)
        q = torch.clamp(kgrid.round_half_away((values + offset) * inverse), 0, self.nmax)
        return q, step * q - offset

    def result(self, codes: torch.Tensor, g_idx: torch.Tensor | None):
        return kgrid.KGridWeight(codes.to(torch.uint8).cpu(), self.d.cpu(), self.dmin.cpu(),
                                 self.sc.to(torch.uint8).cpu(), self.mn.to(torch.uint8).cpu(), self.nmax)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, config: GPTQConfig = GPTQConfig(),
                  storage: Storage = Storage(), keep_rounded: bool = False) -> GPTQResult:
    """Quantize `weight` [out, in] given the Hessian [in, in] of its inputs."""
    out_f, in_f = weight.shape
    if not spec.fits(in_f):
        raise InfoptError(f"group size {spec.group_size} does not divide {in_f} input features")
    device = hessian.device
    scale_dtype = storage.scale_dtype or weight.dtype
    w = weight.to(device, torch.float32).clone()
    h = hessian.to(torch.float32).clone()
    original_h = hessian.to(torch.float32)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    group_size = in_f if spec.group_size == -1 else spec.group_size
    if storage.grid is not None:
        if spec.group_size != kgrid.SUB or in_f % kgrid.SUPER:
            raise InfoptError(f"the {storage.grid} grid needs groups of 32 and rows of a multiple of 256 values")
        params = _KGridParams(out_f, in_f, device)
    else:
        params = _GroupParams(out_f, spec.num_groups(in_f), spec, scale_dtype, device, storage.min_zero_offset)
    fit_width = params.fit_width or group_size
    if spec.group_size == -1:
        params.fit(0, w)
    elif config.static_groups:
        for g in range(in_f // fit_width):
            params.fit(g, w[:, g * fit_width : (g + 1) * fit_width])

    perm = torch.argsort(h.diagonal(), descending=True) if config.act_order else torch.arange(in_f, device=device)
    if config.act_order:
        w = w[:, perm]
        h = h[perm][:, perm]
    # the group of the column at each (possibly permuted) position
    if config.static_groups or spec.group_size == -1:
        position_group = perm // group_size if spec.group_size != -1 else torch.zeros_like(perm)
    else:
        position_group = torch.arange(in_f, device=device) // group_size
    dynamic_groups = spec.group_size != -1 and not config.static_groups

    upper, damp = _inverse_cholesky(h, config.damp)
    codes = torch.zeros(out_f, in_f, dtype=torch.int8, device=device)
    rounded = torch.empty(out_f, in_f, device=device) if keep_rounded else None
    position_group_list = position_group.tolist()
    for start in range(0, in_f, config.block_size):
        end = min(start + config.block_size, in_f)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = position_group_list[column]
            if dynamic_groups and column % fit_width == 0:
                # the group's current values: updated ones inside this block, pending ones beyond it
                inside = block[:, i : i + fit_width]
                beyond = w[:, end : column + fit_width]
                params.fit(group if params.fit_width is None else column // fit_width,
                           torch.cat([inside, beyond], dim=1) if beyond.numel() else inside)
            values = block[:, i]
            q, dequantized = params.quantize(group, values)
            codes[:, column] = q.to(torch.int8)
            if rounded is not None:
                rounded[:, column] = values
            err = (values - dequantized) / u_block[i, i]
            block[:, i:].sub_(err.unsqueeze(1) * u_block[i, i:].unsqueeze(0))
            errors[:, i] = err
        w[:, end:].sub_(errors @ upper[start:end, end:])

    if config.act_order:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        rounded = None if rounded is None else rounded[:, inverse]
        position_group = position_group[inverse]
    g_idx = position_group.to(torch.int32) if config.act_order and dynamic_groups else None
    result = params.result(codes, g_idx)
    return GPTQResult(result, damp, int(dead.sum()), output_error(weight, result.dequantize(), original_h),
                      None if rounded is None else rounded.cpu())


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output MSE over the calibration inputs: tr(E H E^T) / tr(W H W^T)."""
    w = weight.to(hessian.device, torch.float32)
    e = w - quantized.to(hessian.device, torch.float32)
    num = ((e @ hessian) * e).sum()
    den = ((w @ hessian) * w).sum()
    return float(num / den.clamp_min(1e-30))


class GPTQMethod:
    """GPTQ on the sequential driver: one Hessian per group of linears that share an input."""

    name = "gptq"

    def __init__(self, config: GPTQConfig, storage: Storage = Storage()):
        self.config = config.effective(storage)
        self.storage = storage

    def quantize_layer(self, ctx: LayerContext) -> LayerResult:
        result = LayerResult()
        ctx.reuse_attention = True
        for group in ctx.groups:
            hessian = Hessian(group[0].module.in_features, ctx.device)
            ctx.observe_inputs(group[0].module, self._hessian_input(ctx, hessian))
            matrix = hessian.matrix()
            for batch in _same_spec_batches(group):
                start = time.perf_counter()
                outs = self._quantize_together([lin.module.weight.data for lin in batch], matrix, batch[0].spec,
                                               ctx.keep_reference)
                seconds = (time.perf_counter() - start) / len(batch)
                for linear, out in zip(batch, outs):
                    ctx.set_quantized(linear, out.weight, out.rounded_from)
                    result.quantized[linear.name] = out.weight
                    result.info[linear.name] = {"output_error": out.output_error, "damp": out.damp,
                                                "dead_columns": out.dead_columns, "seconds": seconds}
        return result

    @staticmethod
    def _hessian_input(ctx: LayerContext, hessian: Hessian):
        """Under bf16 forwards a linear multiplies its input rounded to bf16, so that is the X of the output error
        GPTQ minimises; it also takes the Hessian's fast exact products (Hessian.add)."""
        if ctx.forward_dtype != torch.bfloat16:
            return hessian.add
        return lambda x: hessian.add(x.to(torch.bfloat16))

    def _quantize_together(self, weights: list[torch.Tensor], hessian: torch.Tensor, spec: QuantSpec,
                           keep_rounded: bool = False) -> list[GPTQResult]:
        """GPTQ treats rows independently given H, so linears sharing an input run as one stacked matrix (one
        column loop instead of several); the result is split back per linear."""
        if len(weights) == 1:
            return [gptq_quantize(weights[0], hessian, spec, self.config, self.storage, keep_rounded)]
        stacked = gptq_quantize(torch.cat(weights), hessian, spec, self.config, self.storage, keep_rounded)
        outs, row = [], 0
        for weight in weights:
            rows = slice(row, row + weight.shape[0])
            w = stacked.weight
            if isinstance(w, kgrid.KGridWeight):
                part = kgrid.KGridWeight(w.codes[rows].clone(), w.d[rows].clone(), w.dmin[rows].clone(),
                                         w.sc[rows].clone(), w.mn[rows].clone(), w.nmax)
            else:
                part = QuantizedWeight(w.codes[rows].clone(), w.scale[rows].clone(),
                                       None if w.zero is None else w.zero[rows].clone(), w.spec,
                                       None if w.g_idx is None else w.g_idx.clone())
            error = output_error(weight, part.dequantize(), hessian)
            rounded = None if stacked.rounded_from is None else stacked.rounded_from[rows].clone()
            outs.append(GPTQResult(part, stacked.damp, stacked.dead_columns, error, rounded))
            row += weight.shape[0]
        return outs


def _same_spec_batches(group: list) -> list[list]:
    """The group's linears in runs that can be stacked: same spec and weight dtype (order kept)."""
    batches: list[list] = []
    for linear in group:
        last = batches[-1][0] if batches else None
        if last is not None and last.spec == linear.spec and last.module.weight.dtype == linear.module.weight.dtype:
            batches[-1].append(linear)
        else:
            batches.append([linear])
    return batches


METHOD = Method("gptq", "GPTQ (Frantar et al. 2022): Hessian-guided rounding, layer by layer", GPTQConfig, INTEGER,
                "compressed-tensors", calibrated=True,
                factory=lambda config, storage, adapter: GPTQMethod(config, storage), grids=("Q4_K",),
                recoverable=True, bf16_forwards=True)
