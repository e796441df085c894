"""The sequential layer driver every calibrated method shares.

For each decoder layer: load it alone from disk, let the method quantize its linears in
true-sequential order (each group sees inputs produced by the already-quantized groups before it),
run the quantized layer to get the next layer's inputs, save the layer's result to a part file in
the work folder, and release it. Peak memory is one layer plus the calibration activations.

A run whose work folder holds finished part files resumes after the last one: the finished layers
are re-run from their saved results to rebuild the activations, so the end result is identical.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from infopt.errors import InfoptError
from infopt.memory import return_freed_memory
from infopt.models.streaming import LayerStream, _StopForward, move_kwargs
from infopt.quant.precision import forward_attention
from infopt.quant.kgrid import KGridWeight
from infopt.quant.weights import QuantizedWeight
from infopt.quant.spec import QuantSpec

Progress = Callable[[str, int, int], None]
STATE_FILE = "state.json"


class ActivationStore:
    """[windows, seq, hidden] activations in host memory, or in a file on disk when `path` is given."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None = None):
        self.dtype = dtype
        if path is None:
            self.data = torch.empty(shape, dtype=dtype)
            return
        storage = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
        array = np.lib.format.open_memmap(str(path), mode="w+", dtype=storage, shape=shape)
        self.data = torch.from_numpy(array).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(array)

    def __len__(self) -> int:
        return self.data.shape[0]


@dataclass
class Linear:
    name: str  # full module name
    module: nn.Linear
    spec: QuantSpec


@dataclass
class LayerResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # full module name -> weight
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # full tensor name -> rewritten tensor
    info: dict[str, dict] = field(default_factory=dict)  # per module: error, damp, seconds, ...


class LayerContext:
    """What a method sees of one decoder layer: its linears in groups and a way to run it.

    Attention reuse (a method opts in with `reuse_attention = True`): attention is the costly part of a layer
    forward on long windows, and once q/k/v are final its output cannot change. So the inputs of the attention's
    output projection, seen while observing that projection, are kept (`attention_cache`, in the activation dtype,
    on disk when activations are); later passes replace the attention module's forward by that projection applied
    to the kept inputs. The first replaced call of a layer is checked against the real attention; a mismatch (an
    architecture whose attention does more after the projection) turns reuse off for the layer.
    """

    reuse_allowed = True  # the class-wide switch (tests compare against runs without reuse)

    def __init__(self, index: int, layer: nn.Module, groups: list[list[Linear]], inputs: ActivationStore,
                 kwargs: dict, device: torch.device, dtype: torch.dtype, micro_batch: int,
                 attention: tuple[str, str] | None = None, scratch_dir: Path | None = None,
                 forward_dtype: torch.dtype | None = None, prefix: str = "", progress: Progress | None = None):
        self.index = index
        self.prefix = prefix  # the layer's module name ("model.layers.3")
        self.progress = progress
        self.layer = layer
        self.groups = groups
        self.inputs = inputs
        self.kwargs = move_kwargs(kwargs, device)
        self.device = device
        self.dtype = dtype
        self.forward_dtype = forward_dtype  # matmuls of layer forwards in this dtype (autocast); None: as stored
        # the rotary tables in the forward dtype too: q and k come out of the projections in it, and a product
        # with fp32 tables would promote them (transformers' rotary then costs 3x: 8.3 vs 2.7 ms per 8192 tokens)
        self.forward_kwargs = self.kwargs if not self._reduced() else {
            k: tuple(t.to(forward_dtype) if t.is_floating_point() else t for t in v)
            if k.startswith("position_embeddings") and isinstance(v, tuple) else v for k, v in self.kwargs.items()}
        self.micro_batch = micro_batch
        self.reuse_attention = False
        self.attention_cache: ActivationStore | None = None
        self._attention = self._attention_out = None
        if attention is not None:
            modules = dict(layer.named_modules())
            self._attention, self._attention_out = modules.get(attention[0]), modules.get(attention[1])
        self._scratch_dir = scratch_dir
        self._cache_file = self.scratch("attention.npy")
        self._verified = False
        # kept by set_quantized while keep_reference is on (block-wise recovery starts from them), per linear: the
        # full-precision weight as the layer had it just before (AWQ's scaled one), and the values the method
        # rounded to get its codes (GPTQ's error-corrected columns; otherwise that same weight)
        self.keep_reference = False
        self.rounded_from: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self._batch_start = 0
        self.attention_outcome: str | None = None  # "reused" or "rejected" once a replaced call was checked

    def _reduced(self) -> bool:
        return self.forward_dtype is not None and self.forward_dtype != self.dtype

    def forward_precision(self):
        """The context the layer's forwards run in (methods running parts of the layer use it too). Reduced-precision
        layer forwards (forward_dtype): linears under autocast, the fp32 weights stay the
        masters; attention on the CPU runs as precision.forward_attention chooses."""
        if not self._reduced():
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.forward_dtype))
        if self.device.type == "cpu":
            stack.enter_context(forward_attention())
        return stack

    def scratch(self, name: str) -> Path | None:
        """Where a method may keep an activation-sized array on disk (None: keep it in memory)."""
        return None if self._scratch_dir is None else self._scratch_dir / name

    @property
    def batch_start(self) -> int:
        """Index of the first window of the batch being run (for observers that keep some windows)."""
        return self._batch_start

    def batches(self):
        """(first window index, micro-batch of inputs on the device) over every calibration window."""
        return self._batches()

    def _batches(self):
        for start in range(0, len(self.inputs), self.micro_batch):
            self._batch_start = start
            yield start, self.inputs.data[start : start + self.micro_batch].to(self.device, self.dtype)

    def run(self, outputs: ActivationStore | None = None) -> None:
        """The layer on every calibration window; outputs stored when a store is given."""
        with torch.no_grad(), self.forward_precision(), self._reused_attention():
            for start, batch in self._batches():
                out = self.layer(batch, **self.forward_kwargs)
                out = out[0] if isinstance(out, tuple) else out
                if outputs is not None:
                    outputs.data[start : start + out.shape[0]] = out.to("cpu", outputs.dtype)

    def observe_inputs(self, module: nn.Module, observe: Callable[[torch.Tensor], None]) -> None:
        """Feed `module`'s inputs on every window to `observe`, running the layer only up to it."""
        self.observe_many([(module, observe)])

    def observe_many(self, observers: list[tuple[nn.Module, Callable[[torch.Tensor], None]]]) -> None:
        """observe_inputs for several modules in one pass: each batch runs the layer until every one of them has
        seen its input."""
        capture = None
        if (self.reuse_allowed and self.reuse_attention and self.attention_cache is None
                and any(module is self._attention_out for module, _ in observers)):
            shape = (len(self.inputs), self.inputs.data.shape[1], self._attention_out.in_features)
            capture = ActivationStore(shape, self.inputs.dtype, self._cache_file)
        pending: list[int] = []

        def hook_for(module, observe):
            def hook(_module, args):
                x = args[0].detach()
                if capture is not None and module is self._attention_out:
                    capture.data[self._batch_start : self._batch_start + x.shape[0]] = x.to("cpu", capture.dtype)
                observe(x)
                pending[0] -= 1
                if pending[0] == 0:
                    raise _StopForward
            return hook

        handles = [module.register_forward_pre_hook(hook_for(module, observe)) for module, observe in observers]
        try:
            with torch.no_grad(), self.forward_precision(), self._reused_attention():
                for _, batch in self._batches():
                    pending[:] = [len(observers)]
                    try:
                        self.layer(batch, **self.forward_kwargs)
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
        if capture is not None:
            self.attention_cache, self._verified = capture, False

    @contextlib.contextmanager
    def _reused_attention(self):
        attention, cache = self._attention, self.attention_cache
        if cache is None or attention is None:
            yield
            return

        def forward(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            kept = cache.data[self._batch_start : self._batch_start + hidden.shape[0]].to(self.device, self.dtype)
            out = self._attention_out(kept)
            if not self._verified:
                real = type(attention).forward(attention, *args, **kwargs)
                real_out = real[0] if isinstance(real, tuple) else real
                if real_out.shape != out.shape or not torch.allclose(real_out, out, rtol=1e-4, atol=1e-5):
                    self.attention_cache, self.attention_outcome = None, "rejected"
                    del attention.forward  # back to the real attention for the rest of this layer
                    return real
                self._verified, self.attention_outcome = True, "reused"
            return out, None

        attention.forward = forward
        try:
            yield
        finally:
            attention.__dict__.pop("forward", None)

    def set_quantized(self, linear: Linear, weight: QuantizedWeight, rounded_from: torch.Tensor | None = None) -> None:
        """Make the layer compute with the dequantized weight from now on. rounded_from: the values the method
        rounded when they are not the module's current weight (GPTQ's error-corrected columns)."""
        if self.keep_reference:
            self.reference[linear.name] = linear.module.weight.data.detach().float().clone()
            self.rounded_from[linear.name] = (self.reference[linear.name] if rounded_from is None
                                              else rounded_from.float())
        linear.module.weight.data = weight.dequantize().to(self.device, self.dtype)
        if self._attention is not None and linear.module is not self._attention_out and any(
                linear.module is m for m in self._attention.modules()):
            self.attention_cache = None  # its inputs changed


class CalibratedMethod(Protocol):
    name: str

    def quantize_layer(self, ctx: LayerContext) -> LayerResult: ...


def _apply(ctx: LayerContext, prefix: str, result: LayerResult) -> None:
    """Put a saved layer result back into a freshly loaded layer (resume)."""
    modules = dict(ctx.layer.named_modules())
    for name, weight in result.quantized.items():
        modules[name[len(prefix) + 1 :]].weight.data = weight.dequantize().to(ctx.device, ctx.dtype)
    if result.dense:
        state = {k[len(prefix) + 1 :]: v.to(ctx.device, ctx.dtype) for k, v in result.dense.items()}
        ctx.layer.load_state_dict(state, strict=False)


def part_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"layer-{index:05d}.safetensors"


def save_part(path: Path, result: LayerResult) -> None:
    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for module, w in result.quantized.items():
        if isinstance(w, KGridWeight):
            for field in ("codes", "d", "dmin", "sc", "mn"):
                tensors[f"{module}::k{field}"] = getattr(w, field)
            specs[module] = ["kgrid", w.nmax]
            continue
        tensors[f"{module}::codes"] = w.codes
        tensors[f"{module}::scale"] = w.scale
        if w.zero is not None:
            tensors[f"{module}::zero"] = w.zero
        if w.g_idx is not None:
            tensors[f"{module}::g_idx"] = w.g_idx
        specs[module] = [w.spec.bits, w.spec.group_size, w.spec.symmetric]
    for name, tensor in result.dense.items():
        tensors[f"{name}::dense"] = tensor
    meta = {"specs": json.dumps(specs, sort_keys=True), "info": json.dumps(result.info, sort_keys=True)}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in sorted(tensors.items())}, str(tmp), metadata=meta)
    tmp.rename(path)


def load_part(path: Path) -> LayerResult:
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    result = LayerResult(info=json.loads(meta["info"]))
    for module, spec in json.loads(meta["specs"]).items():
        if spec[0] == "kgrid":
            result.quantized[module] = KGridWeight(*(tensors[f"{module}::k{f}"] for f in ("codes", "d", "dmin", "sc",
                                                                                           "mn")), spec[1])
            continue
        bits, group, sym = spec
        result.quantized[module] = QuantizedWeight(
            tensors[f"{module}::codes"], tensors[f"{module}::scale"], tensors.get(f"{module}::zero"),
            QuantSpec(bits, group, sym), tensors.get(f"{module}::g_idx"))
    result.dense = {k.removesuffix("::dense"): v for k, v in tensors.items() if k.endswith("::dense")}
    return result


def prepare_work_dir(work_dir: Path, fingerprint: str, resume: bool, force: bool) -> int:
    """Make the work folder ready; return how many layers are already finished there.

    The checkpoint's last bits depend on the number of threads the products run on (their blocking changes with
    it: the fault-test model gives four different checkpoints at 1, 2, 3 and 4 threads), so the run records its
    thread count and a resumed run computes on the same count, whatever the machine gives it now."""
    state_file = work_dir / STATE_FILE
    if work_dir.exists() and not resume:
        if not force:
            raise InfoptError(f"an unfinished run exists in {work_dir}; pass --resume to continue it "
                              "or --force to start over")
        for child in work_dir.iterdir():
            child.unlink()
    if resume and state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            raise InfoptError(f"{work_dir} holds a run with other inputs or settings; "
                              "rerun without --resume and with --force to start over")
        threads = state.get("threads")
        if isinstance(threads, int) and 1 <= threads <= 4096 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        done = 0
        while part_path(work_dir, done).is_file():
            done += 1
        return done
    work_dir.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "threads": torch.get_num_threads()}
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state) + "\n")
    tmp.rename(state_file)
    return 0


def run_layers(stream: LayerStream, windows: torch.Tensor, specs: dict[str, QuantSpec], method: CalibratedMethod,
               work_dir: Path, done: int = 0, activation_dtype: torch.dtype | None = None,
               offload: bool = False, progress: Progress | None = None,
               forward_dtype: torch.dtype | None = None) -> dict:
    """Quantize every decoder layer in turn; results land in `work_dir` as one part file per layer.

    forward_dtype (e.g. bfloat16): the layer forwards' matrix products run in it under autocast, while weights,
    the quantization itself and the stored activations keep their own dtypes."""
    start_time = time.perf_counter()
    inputs = stream.capture_inputs(windows)
    store_dtype = activation_dtype or stream.dtype
    shape = tuple(inputs.hidden.shape)
    current = ActivationStore(shape, store_dtype, work_dir / "act-a.npy" if offload else None)
    current.data.copy_(inputs.hidden)
    del inputs.hidden
    spare = ActivationStore(shape, store_dtype, work_dir / "act-b.npy" if offload else None)
    micro_batch = max(1, 8192 // shape[1])
    timings = []
    reuse = {"reused": 0, "rejected": 0}
    for index in range(stream.num_layers):
        layer_start = time.perf_counter()
        prefix = stream.layer_prefix(index)
        layer = stream.load_layer(index)
        modules = dict(layer.named_modules())
        groups = []
        for group in stream.adapter.linear_groups:
            members = [Linear(f"{prefix}.{rel}", modules[rel], specs[f"{prefix}.{rel}"])
                       for rel in group if f"{prefix}.{rel}" in specs]
            if members:
                groups.append(members)
        attention = (stream.adapter.attention, stream.adapter.attention_out)
        ctx = LayerContext(index, layer, groups, current, inputs.kwargs[index], stream.device, stream.dtype,
                           micro_batch, attention, work_dir if offload else None, forward_dtype, prefix, progress)
        if index < done:
            replay = getattr(method, "replay_layer", None)  # a method keeping state across layers catches up
            if replay is not None:
                replay(ctx)
            _apply(ctx, prefix, load_part(part_path(work_dir, index)))
        else:
            result = method.quantize_layer(ctx)
            save_part(part_path(work_dir, index), result)
        if index + 1 < stream.num_layers:  # the last layer's outputs feed nothing
            ctx.run(outputs=spare)
        if ctx.attention_outcome:
            reuse[ctx.attention_outcome] += 1
        stream.release_layer(index)
        del ctx, layer, modules
        return_freed_memory()
        current, spare = spare, current
        timings.append(time.perf_counter() - layer_start)
        if progress:
            progress("layers", index + 1, stream.num_layers)
    for name in ("act-a.npy", "act-b.npy", "attention.npy", "target-0.npy", "target-1.npy"):
        (work_dir / name).unlink(missing_ok=True)
    return {"seconds": time.perf_counter() - start_time, "layer_seconds": timings, "resumed_layers": done,
            "threads": torch.get_num_threads(), "attention_reuse": reuse}


def iter_results(work_dir: Path, num_layers: int):
    for index in range(num_layers):
        yield index, load_part(part_path(work_dir, index))
