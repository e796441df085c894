"""End-to-end quantization-aware training (`infopt qat`): the whole model trained with its grids in the forward pass.

Two modes, after EfficientQAT (Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training for Large
Language Models"):
- `scales` (its E2E-QP): the integer codes stay fixed; only each group's step size is trained, as a factor m on
  the starting scale (w = (q - z) * s0 * m). Memory: the model plus one factor per group.
- `all`: the weights are trained too, through fake quantization with a straight-through estimator:
  q = clamp(round(W / (s0 m)) + z), w = (q - z) * s0 * m. W starts at the starting checkpoint's dequantized weight
  moved towards the full-precision weight by less than half a step, so the starting codes are exactly the
  checkpoint's and the rounding can move from there.
The loss is distillation (KL from the full-precision model's next-token distribution) or next-token cross-entropy.
The starting point is any integer-grid result (a quantized checkpoint, or RTN of the source); the result is
rounded once into ordinary `QuantizedWeight`s, so every format writer takes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from infopt.errors import InfoptError
from infopt.quant.methods import MethodConfig, option
from infopt.quant.weights import QuantizedWeight

FACTOR_MIN, FACTOR_MAX = 0.25, 4.0  # step-size factor bounds


@dataclass(frozen=True, kw_only=True)
class QATConfig(MethodConfig):
    """Options of `infopt qat` (EfficientQAT's E2E-QP trains step sizes for one epoch with AdamW; these defaults
    are scaled to the small models a CPU trains)."""

    train: str = option("scales", "--train", "scales (only the group step sizes, codes fixed: E2E-QP) or all "
                        "(the weights too, through fake quantization).", choices=("scales", "all"))
    loss: str = option("kl", "--loss", "kl (distillation from the full-precision model's logits) or ce "
                       "(next-token cross-entropy on the text).", choices=("kl", "ce"))
    steps: int = option(200, "--steps", "Optimizer steps.", minimum=1, maximum=10_000_000)
    lr: float = option(1e-3, "--lr", "AdamW learning rate of the step-size factors (linear decay).")
    weight_lr: float = option(1e-5, "--weight-lr", "AdamW learning rate of the weights (--train all).")
    batch: int = option(4, "--batch", "Windows per step.", minimum=1)
    seq_len: int = option(512, "--seq-len", "Tokens per window (capped at the model's context).", minimum=2)
    eval_every: int = option(50, "--eval-every", "Steps between held-out perplexity checks and checkpoints.",
                             minimum=1)
    eval_windows: int = option(16, "--eval-windows", "Held-out windows each check scores.", minimum=1)
    patience: int = option(3, "--patience", "Stop after this many checks without a better held-out perplexity "
                           "(0: never stop early).", minimum=0)
    seed: int = option(0, "--seed", "Seed of the training windows.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lr", "weight_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 1):
                error = InfoptError(f"invalid --{name.replace('_', '-')} {value}: a positive learning rate, at most 1")
                error.field = name
                raise error

    def describe(self) -> str:
        return (f"train {self.train}, loss {self.loss}, {self.steps} steps x {self.batch} x {self.seq_len} tokens, "
                f"AdamW lr {self.lr:g}" + (f" / weights {self.weight_lr:g}" if self.train == "all" else ""))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class QATLinear(nn.Module):
    """A linear computing with its quantized weight; the trainable parts depend on the mode."""

    def __init__(self, start: QuantizedWeight, full_precision: torch.Tensor, bias: torch.Tensor | None,
                 train_weights: bool):
        super().__init__()
        self.spec, self.g_idx, self.scale_dtype = start.spec, start.g_idx, start.scale.dtype
        self.register_buffer("groups", start.column_groups().long())
        self.register_buffer("scale0", start.scale.float())
        self.register_buffer("zero", None if start.zero is None else start.zero.float())
        self.register_buffer("codes", start.codes.float())
        self.factor = nn.Parameter(torch.ones_like(self.scale0))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.weight = None
        if train_weights:
            start_weight = start.dequantize().float()
            half_step = 0.49 * self.scale0[:, self.groups]
            moved = (full_precision.float() - start_weight).clamp(-half_step, half_step)
            self.weight = nn.Parameter(start_weight + moved)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = (self.scale0 * self.factor)[:, self.groups]
        return scale, None if self.zero is None else self.zero[:, self.groups]

    def quantized_weight(self) -> torch.Tensor:
        scale, zero = self._grid()
        levels = self.codes
        if self.weight is not None:
            levels = _round_ste(self.weight / scale) + (0 if zero is None else zero)
            levels = torch.clamp(levels, self.spec.qmin, self.spec.qmax)
        return (levels - zero) * scale if zero is not None else levels * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    def clamp_(self) -> None:
        with torch.no_grad():
            self.factor.clamp_(FACTOR_MIN, FACTOR_MAX)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """Round once: the scale in the starting checkpoint's dtype, codes against exactly that scale."""
        scale = (self.scale0 * self.factor).to(self.scale_dtype)
        codes = self.codes
        if self.weight is not None:
            s = scale.float()[:, self.groups]
            z = 0 if self.zero is None else self.zero[:, self.groups]
            codes = torch.clamp(torch.round(self.weight / s) + z, self.spec.qmin, self.spec.qmax)
        return QuantizedWeight(codes.to(torch.int8).cpu(), scale.cpu(),
                               None if self.zero is None else self.zero.to(torch.int8).cpu(), self.spec, self.g_idx)


def attach(model: nn.Module, start: dict[str, QuantizedWeight], train_weights: bool) -> dict[str, QATLinear]:
    """Replace every linear named in `start` (module name -> weight) by a QATLinear; the rest is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    attached = {}
    for name, weight in start.items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        linear = getattr(holder, child)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != weight.shape:
            raise InfoptError(f"{name}: the starting checkpoint's weight does not fit the model's linear")
        module = QATLinear(weight, linear.weight.data, linear.bias, train_weights).to(linear.weight.device)
        setattr(holder, child, module)
        attached[name] = module
    return attached


def loss_of(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """Mean over predicted tokens: KL(teacher || student) when teacher logits are given, else cross-entropy."""
    logits = student_logits[:, :-1].float()
    if teacher_logits is None:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    log_q = torch.log_softmax(logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
