"""The importance matrix: the mean of x^2 per input column of every decoder linear, over calibration windows.

llama.cpp's llama-imatrix collects the same statistic and its quantizers weight each value's rounding error by it
(`llama-quantize --imatrix`); infopt's ggml quantizers do the same (infopt.formats.ggml_quants). Collected layer by
layer on the streaming loader, so memory stays at one layer plus the activations, and with the full-precision
model throughout (the statistic describes the inputs the source model sees).
"""

from __future__ import annotations

import torch
from torch import nn

from infopt.memory import return_freed_memory
from infopt.models.streaming import LayerStream, move_kwargs


def importance_matrix(stream: LayerStream, windows: torch.Tensor, micro_batch_tokens: int = 8192
                      ) -> dict[str, torch.Tensor]:
    """Weight name -> float32 [in_features]: mean of the squared inputs of that linear."""
    inputs = stream.capture_inputs(windows)
    hidden = inputs.hidden
    micro = max(1, micro_batch_tokens // hidden.shape[1])
    result: dict[str, torch.Tensor] = {}
    for index in range(stream.num_layers):
        layer = stream.load_layer(index)
        prefix = stream.layer_prefix(index)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        handles = []
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                def hook(_module, args, name=name):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                    sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
                    counts[name] = counts.get(name, 0) + x.shape[0]
                handles.append(module.register_forward_pre_hook(hook))
        kwargs = move_kwargs(inputs.kwargs[index], stream.device)
        outputs = torch.empty_like(hidden)
        try:
            with torch.no_grad():
                for start in range(0, len(hidden), micro):
                    batch = hidden[start : start + micro].to(stream.device)
                    out = layer(batch, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    outputs[start : start + out.shape[0]] = out.to("cpu", hidden.dtype)
        finally:
            for handle in handles:
                handle.remove()
        for name, total in sums.items():
            result[f"{prefix}.{name}.weight"] = (total / counts[name]).to(torch.float32).cpu()
        stream.release_layer(index)
        del layer
        return_freed_memory()
        hidden = outputs
    return result
