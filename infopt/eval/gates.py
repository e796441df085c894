"""Quality gates: limits on a checkpoint's measured cost against its source, for CI to act on."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class QualityGates:
    max_ppl_delta: float | None = None  # relative perplexity increase over the source, e.g. 0.05 for +5%
    max_kl: float | None = None  # mean KL(source || checkpoint) per token, nats
    min_top1: float | None = None  # fraction of tokens whose top-1 prediction matches the source's

    def merged_over(self, base: "QualityGates | None") -> "QualityGates":
        """These limits, with `base`'s where these leave one unset (an artifact's gates over the recipe's)."""
        if base is None:
            return self
        return QualityGates(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                               else getattr(base, f.name) for f in fields(self)})

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def failures(self, metrics: dict[str, dict]) -> list[str]:
        """One line per limit a dataset's figures break, naming the dataset, the figure and the limit."""
        out = []
        for dataset, m in metrics.items():
            if self.max_ppl_delta is not None and m["ppl_delta_rel"] > self.max_ppl_delta:
                out.append(f"{dataset}: perplexity {m['ppl_delta_rel']:+.4%} exceeds max_ppl_delta "
                           f"{self.max_ppl_delta:+.4%}")
            if self.max_kl is not None and m["kl_mean"] > self.max_kl:
                out.append(f"{dataset}: KL {m['kl_mean']:.6f} exceeds max_kl {self.max_kl:g}")
            if self.min_top1 is not None and m["top1_agreement"] < self.min_top1:
                out.append(f"{dataset}: top-1 agreement {m['top1_agreement']:.4%} is below min_top1 "
                           f"{self.min_top1:.4%}")
        return out
