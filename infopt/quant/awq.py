"""AWQ: activation-aware per-channel scaling plus a clipping search, on the sequential driver.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration".
Input channels that see large activations matter most, so before rounding, the weights of every
linear fed by one op are multiplied per input channel by s = mean|x|^alpha and the op's output is
divided by s (folded into the preceding norm or linear): the full-precision model is unchanged, but
the salient channels get finer quantization steps. alpha is chosen on a grid by the output error of
the module the linears feed; then, per output channel and group, the weight range is shrunk on a grid
to the clip that minimises the linear's output error, and the weights are rounded.

Order per decoder layer: all scales are searched and folded in full precision (so a fold into an
upstream linear stays exact), then the linears are clipped and quantized group by group in
true-sequential order, each group calibrated on inputs from the already-quantized groups before it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from infopt.quant import kgrid
from infopt.quant.driver import LayerContext, LayerResult
from infopt.quant.methods import INTEGER, CalibratedRun, IntegerScheme, Method, option
from infopt.quant.rtn import compute_qparams, quantize_codes, quantize_rtn
from infopt.quant.weights import QuantizedWeight, Storage
from infopt.quant.spec import QuantSpec

# AutoAWQ leaves q/k unclipped: their errors are amplified by the softmax of attention scores
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")
ERROR_TOKENS = 8192  # calibration tokens the reported output error is measured on


class _Observed:
    """What AWQ keeps of a module's streamed inputs (batches arrive in window order, see LayerContext)."""

    def __init__(self, ctx, windows: torch.Tensor | None, token_step: int, head_tokens: int,
                 window_dtype: torch.dtype | None = None):
        self.ctx, self.token_step, self.head_tokens = ctx, token_step, head_tokens
        self.window_dtype = window_dtype
        self.keep = set(windows.tolist()) if windows is not None else set()
        self.abs_sum, self.count = None, 0
        self.kept, self.sampled_parts, self.head_parts = [], [], []

    def add(self, x: torch.Tensor) -> None:
        batch, seq, features = x.shape
        start = self.ctx.batch_start
        flat = x.reshape(-1, features)
        total = flat.abs().sum(0, dtype=torch.float32).double()  # pairwise in a batch; batches add in float64
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += flat.shape[0]
        rows = [i for i in range(batch) if start + i in self.keep]
        if rows:
            self.kept.append(x[rows].to(self.window_dtype or x.dtype, copy=True))
        first = start * seq
        if self.token_step:
            offset = (-first) % self.token_step  # global token index t is kept when t % step == 0
            self.sampled_parts.append(flat[offset :: self.token_step].clone())
        if first < self.head_tokens:
            self.head_parts.append(flat[: self.head_tokens - first].clone())

    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / self.count).float()

    def windows(self) -> torch.Tensor:
        return torch.cat(self.kept)

    def sampled(self) -> torch.Tensor:
        return torch.cat(self.sampled_parts)

    def head(self) -> torch.Tensor:
        return torch.cat(self.head_parts)


@dataclass(frozen=True, kw_only=True)
class AWQConfig(CalibratedRun, IntegerScheme):
    # asymmetric by default, as AutoAWQ and the AWQ paper quantize (zero points)
    symmetric: bool = option(False, "--sym/--asym", "Symmetric (no zero point) or asymmetric (with zero points).")
    grid: int = option(20, "--awq-grid", "Number of alpha values tried for the scales.", minimum=1)  # alpha in {0, 1/grid, ..}
    # s = mean|x|^a / mean|w|^(1-a) (AutoAWQ's default) instead of mean|x|^a
    duo_scaling: bool = option(True, "--duo-scaling/--no-duo-scaling", "s = mean|x|^a / mean|w|^(1-a), or mean|x|^a alone.")
    clip: bool = option(True, "--awq-clip/--no-awq-clip", "Search a clipping range per group.")
    clip_grid: int = option(20, "--awq-clip-grid", "Clip ratios tried per group.", minimum=1)
    # clip ranges down to (1 - max_shrink) of the original
    max_shrink: float = option(0.5, "--awq-max-shrink", "Largest fraction the clip search removes from a range.",
                               minimum=0.0, maximum=0.99)
    clip_tokens: int = option(4096, "--awq-clip-tokens", "Tokens sampled for the clipping search.", minimum=1)
    # tokens (whole windows, evenly spaced) on which each scale candidate's output error is measured; 0 = all.
    # The AWQ paper (Lin et al. 2023, sec. 4.3) finds the method robust to small calibration sets. Measured
    # 2026-12-02 (int4 asym, 128 windows of 512): 8192 against 16384 tokens gave perplexity +0.352% vs +0.374% on the
    # bench model (g128) and +1.72% vs +1.82% on stories260K (g4), in 0.76x and 0.83x the time.
    search_tokens: int = option(8192, "--awq-search-tokens", "Calibration tokens (whole windows, evenly spaced) each "
                                "scale candidate is scored on; 0 = all.", minimum=0)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec, storage: Storage) -> torch.Tensor:
    if storage.grid is not None:  # GGUF's K-quant grid: the scaled weight rounded as the file will hold it
        return kgrid.round_to_grid(weight.float()).dequantize().to(weight.device, weight.dtype)
    return quantize_rtn(weight, spec, storage).dequantize().to(weight.dtype)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scale for one alpha, normalised so max*min = 1."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        # a dead channel (zero weights and zero activations) would give 0/0; AutoAWQ keeps its denominator off zero too
        s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, norm_offset: float) -> None:
    """Divide prev's output by s and multiply the linears' inputs by s: the function is unchanged."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # RMSNorm: y = norm(x) * (offset + weight)
            weight = prev.weight
            weight.copy_(((weight.float() + norm_offset) / s - norm_offset).to(weight.dtype))
        for linear in linears:
            linear.weight.mul_(s.unsqueeze(0).to(linear.weight.dtype))


class GroupErrors:
    """err[o, g] = mean over tokens t of (x[t, g, :] . d[o, g, :])^2: the squared error that weight error d puts on
    group g's share of output o. tokens: [T, groups, width].

    Where a group is narrower than the token count this goes through each group's Gram matrix G_g = x_g^T x_g / T,
    err = d G d^T, in float64: width^2 work per output and group instead of T * width per clip candidate (32x less
    at group 128 on 4096 tokens), and no cancellation worth the name. Otherwise it multiplies out directly."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        count, groups, width = tokens.shape
        self.gram = None
        if width <= count:
            t = tokens.double().transpose(0, 1)  # [groups, T, width]
            self.gram = (t.transpose(1, 2) @ t) / count

    def __call__(self, diff: torch.Tensor) -> torch.Tensor:
        out_f, groups, width = diff.shape
        err = torch.empty(out_f, groups, dtype=torch.float64, device=diff.device)
        if self.gram is not None:
            rows = max(1, (1 << 23) // (groups * width))  # bound the float64 [groups, rows, width] product
            for r in range(0, out_f, rows):
                d = diff[r : r + rows].double().transpose(0, 1)  # [groups, rows, width]
                err[r : r + rows] = ((d @ self.gram) * d).sum(-1).T
            return err
        rows = max(1, (1 << 26) // max(1, self.tokens.shape[0] * groups))  # bound the [tokens, groups, rows] product
        for r in range(0, out_f, rows):
            partial = torch.einsum("tgw,ogw->tgo", self.tokens, diff[r : r + rows])
            err[r : r + rows] = partial.pow(2).mean(0).T.double()
        return err


class AWQMethod:
    name = "awq"

    def __init__(self, adapter, config: AWQConfig = AWQConfig(), storage: Storage = Storage()):
        self.adapter = adapter
        self.config = config
        self.storage = storage
        self.notes: list[str] = []

    # --- activations -----------------------------------------------------------------------------

    @staticmethod
    def _observe(ctx, module: nn.Module, token_step: int = 0, head_tokens: int = 0) -> "_Observed":
        """Stream the module's inputs over every calibration window, keeping only what the clipping search and the
        report need: every token_step-th token and the first head_tokens tokens."""
        observed = _Observed(ctx, None, token_step, head_tokens)
        ctx.observe_inputs(module, observed.add)
        return observed

    def _observe_scale_inputs(self, ctx, modules: list[nn.Module]) -> list["_Observed"]:
        """The inputs of every scale group's linears, in one pass of the layer: per channel mean |x| over all windows,
        and the search windows (_search_windows) whole. The layer's weights are still the originals, while the
        sequential search folds each group's scale before the next group is scored; a fold leaves the function the
        layer computes unchanged, so every later group's inputs are the same either way (up to rounding).

        Under reduced-precision forwards the kept windows are stored in that dtype: every inspected module starts
        with linears, whose autocast rounds its inputs to it anyway."""
        keep = self._search_windows(*ctx.inputs.data.shape[:2])
        observed = [_Observed(ctx, keep, 0, 0, ctx.forward_dtype) for _ in modules]
        ctx.observe_many([(module, seen.add) for module, seen in zip(modules, observed)])
        return observed

    @staticmethod
    def _run(ctx, module: nn.Module, x: torch.Tensor, attention: bool) -> torch.Tensor:
        """The module on every window, in the layer's forward precision; attention modules get the layer's masks and
        rotary tables (in that precision)."""
        outs = []
        with torch.no_grad(), ctx.forward_precision():
            for start in range(0, x.shape[0], ctx.micro_batch):
                batch = x[start : start + ctx.micro_batch]
                out = module(batch, **ctx.forward_kwargs) if attention else module(batch)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    # --- scale search ------------------------------------------------------------------------------

    def _search_scale(self, ctx, group, linears: list[nn.Linear], specs: list[QuantSpec],
                      observed: "_Observed") -> tuple[torch.Tensor, dict]:
        inspect = ctx.layer.get_submodule(group.inspect)
        x_mean, x = observed.abs_mean(), observed.windows()
        w_mean = None
        if self.config.duo_scaling:
            w = torch.cat([lin.weight.float() for lin in linears])
            w_mean = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)).mean(0)
        attention = group.inspect.endswith("attn")
        target = self._run(ctx, inspect, x, attention)
        originals = [lin.weight.data.clone() for lin in linears]
        losses = []
        for i in range(self.config.grid):
            s = scale_candidates(x_mean, w_mean, i / self.config.grid).to(x.device)
            for lin, w0, spec in zip(linears, originals, specs):
                lin.weight.data = fake_quantize(w0 * s.unsqueeze(0), spec, self.storage) / s.unsqueeze(0)
            losses.append(float((self._run(ctx, inspect, x, attention) - target).float().pow(2).mean()))
        for lin, w0 in zip(linears, originals):
            lin.weight.data = w0
        best = min(range(len(losses)), key=losses.__getitem__)
        s = scale_candidates(x_mean, w_mean, best / self.config.grid).to(x.device)
        return s, {"alpha": best / self.config.grid, "scale_loss": losses[best], "unscaled_loss": losses[0]}

    def _search_windows(self, windows: int, seq: int) -> torch.Tensor:
        """Indices of at most config.search_tokens tokens' worth of windows, evenly spaced whole windows."""
        budget = self.config.search_tokens
        if budget == 0 or windows * seq <= budget:
            return torch.arange(windows)
        count = max(1, budget // seq)
        return torch.linspace(0, windows - 1, count).round().long().unique()

    def _clip_step(self, tokens: int) -> int:
        return math.ceil(tokens / self.config.clip_tokens) if tokens > self.config.clip_tokens else 1

    # --- clipping and rounding ---------------------------------------------------------------------

    def _clip_range(self, weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (output channel, group) min/max after the shrink that minimises the output error."""
        out_f, in_f = weight.shape
        groups = spec.num_groups(in_f)
        width = in_f // groups
        w = weight.float().reshape(out_f, groups, width)
        wmin, wmax = w.amin(-1), w.amax(-1)
        errors = GroupErrors(x.reshape(-1, in_f).float().reshape(-1, groups, width))  # the sampled tokens
        best_err = torch.full((out_f, groups), float("inf"), dtype=torch.float64, device=weight.device)
        best_min, best_max = wmin.clone(), wmax.clone()
        for i in range(int(self.config.max_shrink * self.config.clip_grid)):
            ratio = 1 - i / self.config.clip_grid
            lo, hi = wmin * ratio, wmax * ratio
            scale, zero = compute_qparams(lo, hi, spec, self.storage.scale_dtype or weight.dtype,
                                          self.storage.min_zero_offset)
            codes = quantize_codes(weight, scale, zero, spec).float().reshape(out_f, groups, width)
            z = zero.float().unsqueeze(-1) if zero is not None else 0.0
            err = errors(w - (codes - z) * scale.float().unsqueeze(-1))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_min = torch.where(better, lo, best_min)
            best_max = torch.where(better, hi, best_max)
        return best_min, best_max

    def _quantize(self, weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec,
                  clip: bool) -> QuantizedWeight | kgrid.KGridWeight:
        out_f, in_f = weight.shape
        if self.storage.grid is not None:  # the K grid's fit searches each sub-block's range itself (no clipping)
            return kgrid.round_to_grid(weight.float())
        if clip:
            wmin, wmax = self._clip_range(weight, x, spec)
        else:
            w = weight.float().reshape(out_f, spec.num_groups(in_f), -1)
            wmin, wmax = w.amin(-1), w.amax(-1)
        scale, zero = compute_qparams(wmin, wmax, spec, self.storage.scale_dtype or weight.dtype,
                                      self.storage.min_zero_offset)
        codes = quantize_codes(weight, scale, zero, spec)
        return QuantizedWeight(codes.cpu(), scale.cpu(), None if zero is None else zero.cpu(), spec)

    @staticmethod
    def _output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
        tokens = x.reshape(-1, x.shape[-1]).float()
        ref = tokens @ weight.float().T
        err = tokens @ (weight.float() - quantized.float()).T
        return float(err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))

    # --- the layer ---------------------------------------------------------------------------------

    def quantize_layer(self, ctx: LayerContext) -> LayerResult:
        result = LayerResult()
        prefix = f"{self.adapter.layers}.{ctx.index}"
        specs = {lin.name: lin.spec for group in ctx.groups for lin in group}
        scale_info: dict[str, dict] = {}
        scalable = []
        for group in self.adapter.scale_groups:
            names = [f"{prefix}.{rel}" for rel in group.linears]
            reason = self._unscalable(ctx, group, names, specs)
            if reason:
                for name in names:
                    scale_info[name] = {"scale": f"skipped: {reason}"}
                continue
            scalable.append((group, names, [ctx.layer.get_submodule(rel) for rel in group.linears]))
        start = time.perf_counter()
        observed = self._observe_scale_inputs(ctx, [linears[0] for _, _, linears in scalable])
        observe_seconds = (time.perf_counter() - start) / max(1, len(scalable))
        for group, names, linears in scalable:
            seen = observed.pop(0)  # each group's windows are freed once it is searched
            start = time.perf_counter()
            s, info = self._search_scale(ctx, group, linears, [specs[n] for n in names], seen)
            fold_scale(ctx.layer.get_submodule(group.prev), linears, s, self.adapter.norm_offset)
            info["scale_seconds"] = time.perf_counter() - start + observe_seconds
            for name in names:
                scale_info[name] = info
            prev_name = f"{prefix}.{group.prev}"
            result.dense.update(self._dense_state(ctx, group.prev, prev_name))
        for rel, reason in self.adapter.unscalable:
            scale_info.setdefault(f"{prefix}.{rel}", {"scale": f"skipped: {reason}"})
        ctx.reuse_attention = True  # every scale is folded: the attention output is final once q/k/v are
        windows, seq = ctx.inputs.data.shape[:2]
        for group in ctx.groups:
            observed = self._observe(ctx, group[0].module, token_step=self._clip_step(windows * seq),
                                     head_tokens=ERROR_TOKENS)
            sampled, head = observed.sampled(), observed.head()
            for linear in group:
                start = time.perf_counter()
                clip = self.config.clip and not linear.name.endswith(NO_CLIP) and self.storage.grid is None
                weight = linear.module.weight.data
                q = self._quantize(weight, sampled, linear.spec, clip)
                ctx.set_quantized(linear, q)
                result.quantized[linear.name] = q
                info = dict(scale_info.get(linear.name, {"scale": "skipped: not in a scale group"}))
                info.update({"output_error": self._output_error(weight, q.dequantize().to(weight.device), head), "clipped": clip,
                             "seconds": time.perf_counter() - start})
                result.info[linear.name] = info
        # scaled norms, and scaled upstream linears' biases (their weights are in the quantized result)
        for name in list(result.dense):
            if name.endswith(".weight") and name.removesuffix(".weight") in result.quantized:
                del result.dense[name]
        return result

    def _unscalable(self, ctx, group, names: list[str], specs: dict) -> str | None:
        if not all(n in specs for n in names):
            return "a linear of its group stays in full precision"
        prev = dict(ctx.layer.named_modules()).get(group.prev)
        if prev is None:
            return f"no module {group.prev}"
        width = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
        if width != ctx.layer.get_submodule(group.linears[0]).in_features:
            return f"{group.prev} output ({width}) does not map one to one onto the inputs (grouped-query attention)"
        return None

    @staticmethod
    def _dense_state(ctx, rel: str, full: str) -> dict[str, torch.Tensor]:
        module = ctx.layer.get_submodule(rel)
        return {f"{full}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


METHOD = Method("awq", "AWQ (Lin et al. 2023): activation-aware channel scales and clipping, layer by layer",
                AWQConfig, INTEGER, "compressed-tensors", calibrated=True,
                factory=lambda config, storage, adapter: AWQMethod(adapter, config, storage), recoverable=True,
                bf16_forwards=True, grids=("Q4_K",))
