"""Every quantization method infopt offers: one line each. Adding a method is one file plus one line here."""

from __future__ import annotations

from infopt.errors import InfoptError
from infopt.quant import awq, gptq, hqq, nf4, rtn
from infopt.quant.methods import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    rtn.METHOD,
    gptq.METHOD,
    awq.METHOD,
    nf4.NF4,
    nf4.FP4,
    hqq.METHOD,
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InfoptError(f"method {name!r} is not available (available: {', '.join(METHODS)})")
    return METHODS[name]
