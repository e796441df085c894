"""Block-wise recovery: learn a layer's rounding and group parameters against full-precision activations.

After the base method (RTN, GPTQ or AWQ) has quantized a decoder layer on the sequential driver, the layer's
quantization parameters are tuned so that the quantized layer's output matches the full-precision model's on
the calibration windows, then rounded once and handed on as ordinary `QuantizedWeight`s (so every format writer
takes them unchanged). Per linear, with W the values the base method rounded (GPTQ's error-corrected columns,
AWQ's scaled weights, RTN's weights) and s0 / z0 its group scales / zero points, the learned parameters are

    V in [-0.5, 0.5] per weight (rounding offset),
    lo, hi in [A_MIN, A_MAX] per group (factors on the ends of the representable range, (qmin - z0) s0 and
    (qmax - z0) s0; one factor when symmetric),

and the layer computes with the scale s and zero point z of the scaled range (z rounded),
q = clamp(round(W / s + V) + z), w = (q - z) s, rounding through a straight-through estimator (AutoRound's
min/max-scale form). At V = 0 and factors 1 this is exactly the base method's result.

The update rule is AutoRound's (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs"): signed gradient descent, learning rate 1/steps decayed linearly to zero, 200 steps on
batches of 8 of 128 calibration windows, matmuls under bf16 autocast where it is native; those are the defaults
here. Adam (as OmniQuant / EfficientQAT train their quantization parameters) is the alternative. The objective is
the mean squared error of the layer's output against the full-precision model's activations at that depth, the
layer running on the quantized model's inputs (AutoRound's default: each layer also corrects what the layers
before it got wrong); `target="layer"` matches the full-precision layer on the same inputs instead.

The rounded parameters are scored over all calibration windows CHECKPOINTS times (half-way and at the end); the
best replaces the base result only when its error is lower, so recovery never makes a layer worse on the data it
sees. Memory: the layer, the quantized model's calibration
activations and the full-precision model's (two more activation stores, on disk with --offload-activations):
flat in depth.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from infopt.device import fast_bf16
from infopt.errors import InfoptError
from infopt.quant.driver import ActivationStore, LayerContext, LayerResult
from infopt.quant.methods import MethodConfig, option
from infopt.quant.precision import fp32_attention
from infopt.quant.weights import QuantizedWeight, Storage

A_MIN, A_MAX = 0.5, 1.5  # range factor bounds (AutoRound's SignRoundV2 bounds; SignRound shrinks only, to [0, 1])
ERROR_TOKENS = 8192  # tokens each linear's reported output error is measured on
# Adam's default step, measured on the bench model's first layer (int2 g64, int4 g128; RTN and GPTQ starts): 0.01-0.03
# gave the lowest calibration errors. Sign descent is the default all the same: at int2 g64 Adam's lower
# calibration errors came with a worse held-out perplexity (14.63 vs 14.50), the signed steps' bounded moves
# generalising better.
ADAM_LR = 0.02
CHECKPOINTS = 2  # times the rounded parameters are scored on every calibration window; the best is kept


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig(MethodConfig):
    """Options of the recovery phase (`infopt quantize --recover`); defaults from AutoRound (see the module doc)."""

    steps: int = option(200, "--recover-steps", "Optimizer steps per layer.", minimum=1, maximum=1_000_000)
    lr: float | None = option(None, "--recover-lr", "Learning rate, decayed linearly to 0 (default: 0.02 for adam, "
                              "1/steps for sign).")
    batch: int = option(8, "--recover-batch", "Calibration windows per step.", minimum=1)
    optimizer: str = option("sign", "--recover-optimizer", "sign (AutoRound's signed gradient descent) or adam.",
                            choices=("sign", "adam"))
    learn: str = option("rounding+scales", "--recover-learn", "What is learned: rounding offsets and group "
                        "scales/zero points, or only one of them.", choices=("rounding+scales", "rounding", "scales"))
    target: str = option("model", "--recover-target", "What a layer's output is matched to: the full-precision "
                         "model's activations there (model: the layer also corrects the error of the layers before "
                         "it, as AutoRound does) or the full-precision layer on the same inputs (layer).",
                         choices=("model", "layer"))
    dtype: str = option("auto", "--recover-dtype", "Matmuls of the learning steps: auto (bfloat16 autocast where "
                        "bf16 is native, as AutoRound's amp), float32 or bfloat16. The scored errors use it too.",
                        choices=("auto", "float32", "bfloat16"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            error = InfoptError(f"invalid --recover-lr {self.lr}: a positive learning rate, at most 1")
            error.field = "lr"
            raise error

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return ADAM_LR if self.optimizer == "adam" else 1.0 / self.steps

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.batch} windows, {self.optimizer} lr {self.learning_rate:g} "
                f"(linear decay), learning {self.learn}, target: the full-precision {self.target}'s output")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.dtype == "auto":
            return torch.bfloat16 if fast_bf16(str(device)) else None
        return torch.bfloat16 if self.dtype == "bfloat16" else None


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Learned:
    """One linear's learnable quantization parameters around its base result."""

    def __init__(self, name: str, rel: str, base: QuantizedWeight, weight: torch.Tensor, storage: Storage,
                 config: RecoveryConfig, device: torch.device):
        self.name, self.rel, self.base, self.spec = name, rel, base, base.spec  # full module name, layer weight
        self.shape = base.shape
        # contiguous groups: weights viewed as [out, groups, width] against [out, groups, 1] scales (no gathers)
        self.contiguous = base.g_idx is None
        self.w = self._view(weight.to(device, torch.float32))
        self.groups = base.column_groups().long().to(device)
        self.s0 = base.scale.to(device, torch.float32)
        self.z0 = None if base.zero is None else base.zero.to(device, torch.float32)
        self.zmin = self.spec.qmin + storage.min_zero_offset
        learn_rounding = config.learn != "scales"
        learn_scales = config.learn != "rounding"
        # the base codes are the nearest rounding of `weight` on the base grid, so V = 0 reproduces them
        self.v = torch.zeros_like(self.w, requires_grad=learn_rounding)
        # range factors: the representable range's ends, (qmin - z0) s0 and (qmax - z0) s0, scaled (one factor for
        # both ends when symmetric); scale and zero point follow from the scaled range, as AutoRound's min/max scales
        self.lo = None if self.z0 is None else torch.ones_like(self.s0, requires_grad=learn_scales)
        self.hi = torch.ones_like(self.s0, requires_grad=learn_scales)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.lo, self.hi) if t is not None and t.requires_grad]

    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        for t in (self.lo, self.hi):
            if t is not None:
                t.clamp_(A_MIN, A_MAX)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.shape[0], self.base.scale.shape[1], -1) if self.contiguous else t

    def _grid(self, scale: torch.Tensor, zero: torch.Tensor | None):
        """Scales / zero points laid out against the weights."""
        if self.contiguous:
            return scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        return scale[:, self.groups], None if zero is None else zero[:, self.groups]

    def _scale_zero(self, round_zero) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group scale and zero point of the scaled range (exactly s0, z0 at factors 1)."""
        if self.z0 is None:
            return self.s0 * self.hi, None
        # in units of s0 (exact at factors 1): the range is [lo (qmin - z0), hi (qmax - z0)]
        low = self.lo * (self.spec.qmin - self.z0)
        ratio = ((self.hi * (self.spec.qmax - self.z0) - low) / (self.spec.qmax - self.spec.qmin)).clamp_min(1e-6)
        zero = torch.clamp(round_zero(self.spec.qmin - low / ratio), self.zmin, self.spec.qmax)
        return self.s0 * ratio, zero

    def fake(self) -> torch.Tensor:
        """The dequantized weight the layer computes with while learning (differentiable in v, lo, hi)."""
        s, z = self._grid(*self._scale_zero(_round_ste))
        levels = _round_ste(self.w / s + self.v)
        if z is not None:
            levels = levels + z
        q = torch.clamp(levels, self.spec.qmin, self.spec.qmax)
        return ((q - z) * s if z is not None else q * s).reshape(self.shape)

    @torch.no_grad()
    def rounded(self) -> QuantizedWeight:
        """Round once: scales in the base result's (storage) dtype, codes against exactly those scales."""
        scale, zero = self._scale_zero(torch.round)
        scale = scale.to(self.base.scale.dtype)
        s, z = self._grid(scale.float(), zero)
        levels = torch.round(self.w / s + self.v)
        if z is not None:
            levels += z
        codes = torch.clamp(levels, self.spec.qmin, self.spec.qmax).to(torch.int8).reshape(self.shape)
        return QuantizedWeight(codes.cpu(), scale.cpu(), None if zero is None else zero.to(torch.int8).cpu(),
                               self.spec, self.base.g_idx)


def _layer_output(ctx: LayerContext, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = functional_call(ctx.layer, weights, (x,), ctx.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _full_precision_outputs(ctx: LayerContext, inputs: ActivationStore, store: ActivationStore) -> None:
    """The layer as loaded (full precision) on `inputs`, into `store`."""
    for start in range(0, len(inputs), ctx.micro_batch):
        batch = inputs.data[start : start + ctx.micro_batch].to(ctx.device, ctx.dtype)
        store.data[start : start + batch.shape[0]] = _layer_output(ctx, {}, batch).to("cpu", store.dtype)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if device.type == "cpu":
        stack.enter_context(fp32_attention())
    return stack


@torch.no_grad()
def _relative_error(ctx: LayerContext, targets: ActivationStore, weights: dict[str, torch.Tensor],
                    autocast: torch.dtype | None = None) -> float:
    """sum (out - target)^2 / sum target^2 over every calibration window."""
    num = den = 0.0
    for start, batch in ctx.batches():
        y = targets.data[start : start + batch.shape[0]].to(ctx.device, torch.float32)
        with _autocast(ctx.device, autocast):
            out = _layer_output(ctx, weights, batch).float()
        num += float((out - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return num / max(den, 1e-30)


class Recovery:
    """A calibrated method for the driver: the base method's layer result, then its parameters learned."""

    def __init__(self, base, config: RecoveryConfig, storage: Storage, seed: int = 0):
        self.base, self.config, self.storage, self.seed = base, config, storage, seed
        self.name = f"{base.name}+recover"
        self._model_inputs: ActivationStore | None = None  # the full-precision model's inputs to the next layer

    def _targets(self, ctx: LayerContext) -> ActivationStore:
        """The layer's full-precision outputs the quantized layer learns to match; with target "model" they are
        also the full-precision model's inputs to the next layer (a second activation stream, flat in depth)."""
        inputs = ctx.inputs
        if self.config.target == "model" and self._model_inputs is not None:
            inputs = self._model_inputs
        store = ActivationStore(tuple(inputs.data.shape), inputs.dtype, ctx.scratch(f"target-{ctx.index % 2}.npy"))
        _full_precision_outputs(ctx, inputs, store)
        if self.config.target == "model":
            self._model_inputs = store
        return store

    def replay_layer(self, ctx: LayerContext) -> None:
        """A resumed run's finished layer: only the full-precision stream moves on (the driver applies the rest)."""
        if self.config.target == "model":
            self._targets(ctx)

    def quantize_layer(self, ctx: LayerContext) -> LayerResult:
        start = time.perf_counter()
        for p in ctx.layer.parameters():
            p.requires_grad_(False)
        targets = self._targets(ctx)
        ctx.keep_reference = True
        result = self.base.quantize_layer(ctx)
        learned = []
        for name, weight in result.quantized.items():
            if not isinstance(weight, QuantizedWeight):
                raise InfoptError(f"{name}: recovery needs integer group weights, not {type(weight).__name__}")
            learned.append(_Learned(name, name[len(ctx.prefix) + 1 :] + ".weight", weight, ctx.rounded_from[name],
                                    self.storage, self.config, ctx.device))
        base_weights = {p.rel: p.base.dequantize().to(ctx.device, torch.float32) for p in learned}
        autocast = self.config.autocast_dtype(ctx.device)  # scored as learned (bf16 products keep ~1e-5 here)
        before = _relative_error(ctx, targets, base_weights, autocast)
        best = {"error": before, "step": 0, "weights": None}  # None: the base result
        tuned_error = before

        def checkpoint(step: int) -> None:
            nonlocal tuned_error
            tuned = {p.name: p.rounded() for p in learned}
            tuned_error = _relative_error(ctx, targets, {p.rel: tuned[p.name].dequantize().to(ctx.device,
                                                         torch.float32) for p in learned}, autocast)
            if tuned_error < best["error"]:
                best.update(error=tuned_error, step=step, weights=tuned)

        self._learn(ctx, learned, targets, checkpoint, f"recover layer {ctx.index} (error {before:.3e})")
        kept = "base" if best["weights"] is None else "recovered"
        if best["weights"] is not None:
            result.quantized.update(best["weights"])
        modules = {p.name: ctx.layer.get_submodule(p.rel.removesuffix(".weight")) for p in learned}
        for p in learned:
            modules[p.name].weight.data = result.quantized[p.name].dequantize().to(ctx.device, ctx.dtype)
        ctx.attention_cache = None  # q/k/v changed
        errors = _output_errors(ctx, {p.name: (modules[p.name], ctx.reference[p.name]) for p in learned})
        for name, error in errors.items():
            info = result.info.setdefault(name, {})
            if "output_error" in info:
                info["output_error_base"] = info["output_error"]
            info["output_error"] = error
        result.info[ctx.prefix] = {"recovery": {
            "loss_before": before, "loss_after": best["error"], "loss_last": tuned_error, "best_step": best["step"],
            "kept": kept, "steps": self.config.steps, "seconds": time.perf_counter() - start}}
        ctx.keep_reference = False
        if ctx.progress is not None:
            ctx.progress(f"layer {ctx.index}: error {before:.3e} -> {best['error']:.3e} ({kept})", 1, 1)
        return result

    def _learn(self, ctx: LayerContext, learned: list[_Learned], targets: ActivationStore,
               checkpoint: Callable[[int], None], stage: str = "recover") -> None:
        """The optimizer steps; `checkpoint(step)` rounds and scores the parameters CHECKPOINTS times on the way."""
        config = self.config
        tensors = [t for p in learned for t in p.tensors()]
        if not tensors:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.index)
        windows = len(ctx.inputs)
        adam = torch.optim.Adam(tensors, lr=config.learning_rate) if config.optimizer == "adam" else None
        autocast = config.autocast_dtype(ctx.device)
        every = max(1, config.steps // CHECKPOINTS)
        for step in range(config.steps):
            rows = torch.randperm(windows, generator=generator)[: config.batch].sort().values
            x = ctx.inputs.data[rows].to(ctx.device, torch.float32)
            y = targets.data[rows].to(ctx.device, torch.float32)
            weights = {p.rel: p.fake() for p in learned}
            with _autocast(ctx.device, autocast):
                out = _layer_output(ctx, weights, x)
            loss = (out.float() - y).pow(2).mean()
            for t in tensors:
                t.grad = None
            loss.backward()
            lr = config.learning_rate * (1 - step / config.steps)
            with torch.no_grad():
                if adam is not None:
                    for group in adam.param_groups:
                        group["lr"] = lr
                    adam.step()
                else:
                    for t in tensors:
                        t.sub_(lr * torch.sign(t.grad))
                for p in learned:
                    p.clamp_()
            if (step + 1) % every == 0 or step + 1 == config.steps:
                checkpoint(step + 1)
            if ctx.progress is not None:
                ctx.progress(stage, step + 1, config.steps)


@torch.no_grad()
def _output_errors(ctx: LayerContext, linears: dict[str, tuple[nn.Linear, torch.Tensor]]) -> dict[str, float]:
    """Per linear: ||(W_q - W) x||^2 / ||W x||^2 over the first ERROR_TOKENS calibration tokens it sees, W the
    full-precision weight in the layer's final parametrization (AWQ's scaled one)."""
    sums = {name: [0.0, 0.0] for name in linears}
    handles = []
    for name, (module, reference) in linears.items():
        ref = reference.to(ctx.device, torch.float32)

        def hook(mod, args, name=name, ref=ref):
            x = args[0].float()
            e = torch.nn.functional.linear(x, mod.weight.float() - ref)
            sums[name][0] += float(e.pow(2).sum())
            sums[name][1] += float(torch.nn.functional.linear(x, ref).pow(2).sum())

        handles.append(module.register_forward_pre_hook(hook))
    seen = 0
    try:
        for _, batch in ctx.batches():
            ctx.layer(batch, **ctx.kwargs)
            seen += batch.shape[0] * batch.shape[1]
            if seen >= ERROR_TOKENS:
                break
    finally:
        for h in handles:
            h.remove()
    return {name: num / max(den, 1e-30) for name, (num, den) in sums.items()}


class PerWeight:
    """A calibration-free method (RTN) as a driver method, so recovery can start from it."""

    def __init__(self, quantizer, name: str):
        self.quantizer, self.name = quantizer, name

    def quantize_layer(self, ctx: LayerContext) -> LayerResult:
        result = LayerResult()
        for group in ctx.groups:
            for linear in group:
                weight = self.quantizer.quantize_weight(linear.module.weight.data, linear.spec)
                ctx.set_quantized(linear, weight)
                result.quantized[linear.name] = weight
        return result
