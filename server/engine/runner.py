"""Running one forward pass of a batch: the model-specific part of the local engine.

`TransformersRunner` works for any causal LM that transformers runs with a Cache-like object
(`past_key_values.update(...)`), an explicit 4D mask and position ids.

`LlamaRunner` is the fast path for Llama-architecture models (SmolLM2, Llama, and merged LoRA
policies of them). Measured on this project's CPU at 16 streams, a decode step through the
generic transformers forward spends about a third of its time outside the matrix products
(module dispatch, hooks, mask and cache plumbing), and the 49k-token output projection runs at
half the speed of the other layers. So this runner:

- computes the same maths as transformers' Llama with the fewest tensor ops: fused q/k/v and
  gate/up projections, `F.rms_norm`, one rotary table per step, sdpa with grouped-query heads
  packed for a single query token (no K/V repeat);
- multiplies with weights pre-packed once for oneDNN (`mkldnn._linear_pointwise`), which for
  small batches is up to 2x faster than the default GEMM on the output projection.

Results match transformers' forward to float32 rounding (tests hold them to it). The weights
are read from the model, never changed; packed copies are the runner's own.

`weight_format` (ENGINE_DTYPE) chooses those copies: float32 (oneDNN-packed), bfloat16, or
int8 / int4 weight-only quantized and multiplied by torch's own CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`: what torchao's CPU layouts dispatch to,
without its tensor-subclass dispatch on every call); every format but float32 computes its
activations, and keeps its KV cache, in bfloat16. The model stays float32, so adapters merge
into float32 master weights and are quantized once afterwards.

A LoRA version is the base runner plus its adapter applied on the fly (`with_adapter`): every
projection the adapter touches adds x A^T B^T (two small matmuls per fused projection) to the
base's packed product, so a version costs its adapter's few MB and is ready in the time it
takes to read them, instead of a merged copy of every adapted weight, packed again (seconds on
SmolLM2 for an adapter on every projection). The price is per step: with such an adapter
(rank 16) a decode step on this CPU takes ~12% longer at 16 rows (49.6 vs 44.4 ms) and ~15%
at 1 row; with q/v only, ~2%. `merged()` folds the adapter into private weights afterwards.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class TransformersRunner:
    """Any causal LM, through its own forward."""

    name = "transformers"

    def __init__(self, model: Any):
        self.model = model
        # sdpa takes boolean masks; eager-style attention adds a float mask to its scores.
        self.float_mask = getattr(model.config, "_attn_implementation", "sdpa") != "sdpa"

    def forward(self, input_ids, positions, mask, step_cache) -> torch.Tensor:
        """Logits [n, vocab] of each row's last position."""
        device, dtype = self.model.device, self.model.dtype
        if self.float_mask:
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        output = self.model(
            input_ids=input_ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask.to(device),
            past_key_values=step_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].float()


# What ENGINE_DTYPE may name: how the runner stores the projections' weights. float32 and
# bfloat16 are plain copies; int8 and int4 are weight-only quantized, multiplied by torch's own
# CPU kernels (the ones torchao's CPU layouts dispatch to) with bfloat16 activations.
WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
# What the server's ENGINE_DTYPE defaults to: int4 where the Llama runner serves the model (a
# float32 Llama on CPU), float32 otherwise. On SmolLM2 it reproduces its Q4_1 file's weights
# exactly and computes what bfloat16 computes (bench/quality.py), and through the real server it
# served 2.2-2.9x float32's tokens/s at 1 stream and 0.9-1.25x at 16 and 64 (bench/serve.py, README).
AUTO = "auto"
# Weights per int4 scale/zero pair, along the input dimension: GGUF's Q4_0/Q4_1 block size, so a
# model converted from a Q4_1 file (the default SmolLM2) falls back onto its own 16-level grid.
INT4_GROUP = 32
# The output projection's format where it differs from the layers': int4 keeps it in int8, as
# GGUF's 4-bit files keep it in 8 bits (the default SmolLM2's, tied to its embeddings, is Q8_0):
# every logit goes through it, and 4 bits there cost more perplexity than all the layers' do.
HEAD_FORMAT = {"int4": "int8"}


def activation_dtype(weight_format: str) -> torch.dtype:
    """The dtype a runner computes in (and keeps its KV cache in) for a weight format: the
    int8/int4 kernels take bfloat16 inputs (their float32 paths are several times slower)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r}: one of {', '.join(WEIGHT_FORMATS)}")
    return torch.float32 if weight_format == "float32" else torch.bfloat16


class _Linear:
    """y = x W^T (+ b) with W stored in the runner's weight format: float32 packed once for
    oneDNN when available (else plain F.linear), bfloat16, or int8 / int4 weight-only.

    Built from the model's Linear modules (several are fused by concatenating their outputs).
    `reuse` is the same projection in another runner: when it was built from the very same
    tensors in the same format (a LoRA version shares all the base weights its adapter leaves
    alone), its prepared weight is shared instead of prepared again, which keeps a hot swap fast
    and small.
    """

    packed_available: bool | None = None

    def __init__(self, modules: list[Any], batch_hint: int, reuse: _Linear | None = None,
                 weight_format: str = "float32"):
        self.modules = modules  # the model's own (a later merge reads their weights)
        self.format = weight_format
        self.dtype = activation_dtype(weight_format)
        sources = [t for m in modules for t in (m.weight, getattr(m, "bias", None)) if t is not None]
        self.key = (weight_format, *((id(t), t.data_ptr(), tuple(t.shape)) for t in sources))
        self.in_features = modules[0].weight.shape[1]
        self.parts = [m.weight.shape[0] for m in modules]  # output rows of each fused module
        if reuse is not None and reuse.key == self.key:
            self.weight, self.bias, self.packed, self.kernel = reuse.weight, reuse.bias, reuse.packed, reuse.kernel
            self.scales = reuse.scales
            return
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)
        biases = [getattr(m, "bias", None) for m in modules]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([
                b.detach() if b is not None else weight.new_zeros(m.weight.shape[0]) for m, b in zip(modules, biases)
            ]).to(self.dtype)
        self._pack(weight, batch_hint)

    def _pack(self, weight: torch.Tensor, batch_hint: int) -> None:
        """Prepare `weight` (float32, the model's master copy or a merge of it) in this
        projection's format; `kernel` says which multiply __call__ runs."""
        self.packed = self.scales = None
        self.kernel = "linear"
        on_cpu = weight.device.type == "cpu"
        if self.format == "int4" and on_cpu and self.in_features % INT4_GROUP == 0:
            self.weight, self.scales = _quantize_int4(weight.float())
            self.kernel = "int4"
            return
        if self.format in ("int8", "int4") and on_cpu:  # int4 where the groups do not fit: int8
            self.weight, self.scales = _quantize_int8(weight.float())
            self.kernel = "int8"
            return
        self.weight = weight.to(self.dtype).contiguous()
        if _Linear.packed_available is not False and on_cpu and self.weight.dtype == torch.float32:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)
                _Linear.packed_available = True
                self.weight = None  # the packed copy is all this runner needs
                self.kernel = "packed"
            except (RuntimeError, AttributeError):
                _Linear.packed_available = False
                log.info("oneDNN packed linear unavailable: using F.linear")

    def merged(self, a: torch.Tensor, updates: list[tuple[slice, slice, torch.Tensor]], batch_hint: int) -> _Linear:
        """This projection with low-rank updates folded into a private weight (see _LowRank)."""
        clone = copy.copy(self)
        clone.key = ()  # its weight is its own: nothing may share it by key
        # Folded into the float32 master weights, then prepared (quantized) once: the merged
        # version is as close to its float32 maths as the base is to the base's.
        weight = torch.cat([m.weight.detach() for m in self.modules], dim=0).float()
        for u_columns, out_columns, b_t in updates:
            weight[out_columns].addmm_(b_t.t().float(), a[u_columns].float())
        clone._pack(weight, batch_hint)
        return clone

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.kernel == "linear":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "int4":
            y = torch._weight_int4pack_mm_for_cpu(flat, self.weight, INT4_GROUP, self.scales)
        else:
            y = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (torchao's int8 weight-only scheme): (int8 [out, in],
    bfloat16 scales [out]) for torch._weight_int8pack_mm."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
    quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized.contiguous(), scales.to(torch.bfloat16)


def _quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of INT4_GROUP inputs with a float zero point (torchao's
    Int4CPULayout scheme, = GGUF's Q4_1): w ~ (q - 8) * scale + zero, q in [0, 15]. Returns
    (packed weight, bfloat16 [groups, out, 2] scales and zeros) for
    torch._weight_int4pack_mm_for_cpu.

    A group that already lies on a 16-level grid (every group of a model converted from a
    Q4_1 GGUF, like the default SmolLM2) keeps that grid: its step is the smallest gap between
    its distinct values, so the codes reproduce it exactly, where a min/max grid would move
    every value of a group that does not use both extreme levels. Other groups get the min/max
    grid. The scale is rounded to bfloat16 (what the kernel reads) before the zero point is
    fitted to the codes, so the rounding of the one cannot shift the grid of the other."""
    out, inputs = weight.shape
    groups = weight.view(out, inputs // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    spread = (high - low).clamp(min=1e-12)
    ordered = groups.sort(dim=-1).values
    gaps = ordered[..., 1:] - ordered[..., :-1]
    gaps = torch.where(gaps > 1e-4 * spread[..., None], gaps, torch.full_like(gaps, float("inf")))
    step = gaps.amin(dim=-1)
    on_grid = torch.isfinite(step) & (spread / step <= 15 + 1e-3)
    if on_grid.any():
        codes = (groups - low[..., None]) / step[..., None]
        off = (codes - codes.round()).abs().amax(dim=-1)
        on_grid &= off < 1e-2
    scales = torch.where(on_grid, step, spread / 15).to(torch.bfloat16).float()
    quantized = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    # The zero point that fits these codes best (least squares), then rounded like the scale.
    zeros = (groups - (quantized - 8) * scales[..., None]).mean(dim=-1)
    packed = torch._convert_weight_to_int4pack_for_cpu(quantized.to(torch.int32).view(out, inputs), 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


class _LowRank:
    """A base projection plus a LoRA update: y = base(x) + scaling * (x A^T) B^T.

    For a fused projection, A [rank, in] stacks the A matrices of the adapted parts (one matmul
    for all of them) and each part's scaled B^T adds into that part's output columns.

    The low-rank product runs in float32 whatever the runner computes in: on a CPU without
    bfloat16 arithmetic (this project's: AVX2) bfloat16 matmuls this small are several times
    slower, and they doubled an int4 runner's 1-row decode step with a rank-16 adapter on every
    projection (7.4 -> 14.9 ms on SmolLM2).
    """

    def __init__(self, base: _Linear, a: torch.Tensor, updates: list[tuple[slice, slice, torch.Tensor]]):
        self.base = base
        self.in_features, self.parts = base.in_features, base.parts
        self.a = a.contiguous()
        self.updates = updates  # (columns of u, output columns, scaled B^T [rank, out])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        u = F.linear(x.float(), self.a).view(-1, self.a.shape[0])
        flat = y.view(-1, y.shape[-1])
        for u_columns, out_columns, b_t in self.updates:
            if flat.dtype == torch.float32:
                flat[:, out_columns].addmm_(u[:, u_columns], b_t)
            else:
                flat[:, out_columns] += (u[:, u_columns] @ b_t).to(flat.dtype)
        return y

    @classmethod
    def build(cls, base: _Linear, factors: list[tuple[torch.Tensor, torch.Tensor] | None],
              scaling: float) -> _Linear | _LowRank:
        """`base` with the update of each part's (A, B) (None: that part is not adapted)."""
        if all(f is None for f in factors):
            return base
        a_parts, updates = [], []
        rank_start = out_start = 0
        for factor, out in zip(factors, base.parts):
            if factor is not None:
                a, b = factor
                rank = a.shape[0]
                if a.shape[1] != base.in_features or tuple(b.shape) != (out, rank):
                    raise ValueError(
                        f"LoRA factors of shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                        f"{base.in_features} -> {out} projection: the adapter was trained on another model"
                    )
                a_parts.append(a.float())
                b_t = (b.float() * scaling).t().contiguous()
                updates.append((slice(rank_start, rank_start + rank), slice(out_start, out_start + out), b_t))
                rank_start += rank
            out_start += out
        return cls(base, torch.cat(a_parts), updates)

    def merged(self, batch_hint: int) -> _Linear:
        return self.base.merged(self.a, self.updates, batch_hint)


# The fused projections of a Llama layer: runner attribute -> the model's modules, in order.
_PROJECTIONS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
_LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")


class _Layer:
    def __init__(self, layer: Any, batch_hint: int, reuse: _Layer | None, weight_format: str):
        attention, mlp = layer.self_attn, layer.mlp
        fmt = weight_format
        self.qkv = _Linear([attention.q_proj, attention.k_proj, attention.v_proj], batch_hint, reuse and reuse.qkv, fmt)
        self.o = _Linear([attention.o_proj], batch_hint, reuse and reuse.o, fmt)
        self.gate_up = _Linear([mlp.gate_proj, mlp.up_proj], batch_hint, reuse and reuse.gate_up, fmt)
        self.down = _Linear([mlp.down_proj], batch_hint, reuse and reuse.down, fmt)
        dtype = activation_dtype(weight_format)
        self.input_norm = layer.input_layernorm.weight.detach().to(dtype)
        self.post_norm = layer.post_attention_layernorm.weight.detach().to(dtype)
        self.intermediate = mlp.gate_proj.weight.shape[0]

    def adapted(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> _Layer:
        """This layer with LoRA updates on its projections (`factors`: module name within the
        layer, e.g. "self_attn.q_proj" -> (A, B)); the base projections are shared."""
        clone = copy.copy(self)
        for attribute, names in _PROJECTIONS.items():
            parts = [factors.get(name) for name in names]
            setattr(clone, attribute, _LowRank.build(getattr(self, attribute), parts, scaling))
        return clone

    def merged(self, batch_hint: int) -> _Layer:
        """This layer with its LoRA updates folded into private weights."""
        clone = copy.copy(self)
        for attribute in _PROJECTIONS:
            projection = getattr(self, attribute)
            if isinstance(projection, _LowRank):
                setattr(clone, attribute, projection.merged(batch_hint))
        return clone


class LlamaRunner:
    """The lean forward for Llama-architecture models (see the module docstring)."""

    name = "llama"

    @staticmethod
    def supports(model: Any) -> bool:
        config = model.config
        return (
            getattr(config, "model_type", None) == "llama"
            and type(model).__name__ == "LlamaForCausalLM"
            and getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1
            and model.device.type == "cpu"
            and model.dtype == torch.float32
        )

    def __init__(self, model: Any, batch_hint: int = 16, reuse: LlamaRunner | None = None,
                 weight_format: str = "float32"):
        config = model.config
        self.model = model
        self.batch_hint = batch_hint
        self.weight_format = weight_format
        self.dtype = activation_dtype(weight_format)  # activations and the KV cache
        self.adapted = False  # some projections carry LoRA updates applied on the fly
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv_heads
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.final_norm = model.model.norm.weight.detach().to(self.dtype)
        if reuse is not None and len(reuse.layers) != len(model.model.layers):
            reuse = None
        self.layers = [
            _Layer(layer, batch_hint, reuse.layers[i] if reuse else None, weight_format)
            for i, layer in enumerate(model.model.layers)
        ]
        self.head = _Linear([model.lm_head], batch_hint, reuse.head if reuse else None, HEAD_FORMAT.get(weight_format, weight_format))
        self.split = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]

    def with_adapter(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> LlamaRunner | None:
        """A runner for this model plus a LoRA adapter (`factors`: module path, e.g.
        "model.layers.0.self_attn.q_proj" -> (A [rank, in], B [out, rank]), as
        deploy.policy.read_lora_factors gives them), applied on the fly and sharing every
        base weight. None when the adapter touches anything but the layers' projections (the
        embeddings or the output head): merge those into the weights instead."""
        per_layer: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.layers]
        known = {name for names in _PROJECTIONS.values() for name in names}
        for path, pair in factors.items():
            match = _LAYER_MODULE.fullmatch(path)
            if match is None or match[2] not in known or int(match[1]) >= len(self.layers):
                return None
            per_layer[int(match[1])][match[2]] = pair
        clone = copy.copy(self)
        clone.layers = [layer.adapted(f, scaling) if f else layer for layer, f in zip(self.layers, per_layer)]
        clone.adapted = True
        return clone

    def merged(self) -> LlamaRunner:
        """This runner with its adapter folded into private weights of the projections it
        touches: the base's decode speed, for the memory of those weights and the CPU time to
        build and pack them (seconds on SmolLM2 with an adapter on every projection)."""
        clone = copy.copy(self)
        clone.layers = [layer.merged(self.batch_hint) for layer in self.layers]
        clone.adapted = False
        return clone

    def forward(self, input_ids, positions, mask, step_cache, every_position: bool = False) -> torch.Tensor:
        """Logits [n, vocab] of each row's last position ([n, q, vocab] of every position with
        `every_position`: perplexity checks of a weight format, bench/quality.py)."""
        n, q_len = input_ids.shape
        # sdpa turns a boolean mask into an additive one on every call: do it once per step.
        mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, float("-inf"))
        hidden = self.embed(input_ids).to(self.dtype)
        cos, sin = self.rotary(hidden, positions)  # [n, q, head_dim]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for index, layer in enumerate(self.layers):
            normed = F.rms_norm(hidden, (self.hidden,), layer.input_norm, self.eps)
            q, k, v = layer.qkv(normed).split(self.split, dim=-1)
            q = q.view(n, q_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(n, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(n, q_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = step_cache.update(k, v, index)
            hidden = hidden + layer.o(self._attention(q, keys, values, mask, n, q_len))
            normed = F.rms_norm(hidden, (self.hidden,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(normed).split(layer.intermediate, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
        if every_position:
            return self.head(F.rms_norm(hidden, (self.hidden,), self.final_norm, self.eps)).float()
        last = F.rms_norm(hidden[:, -1:, :], (self.hidden,), self.final_norm, self.eps)
        return self.head(last)[:, -1, :].float()

    def _attention(self, q, keys, values, mask, n, q_len) -> torch.Tensor:
        if q_len == 1 and self.groups > 1:
            # One query token: fold the query heads sharing a K/V head into its "length"
            # axis, so attention runs per K/V head and K/V are never repeated.
            packed = q.reshape(n, self.n_kv_heads, self.groups, self.head_dim)
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=self.scale)
            return out.reshape(n, 1, self.n_heads * self.head_dim)
        if self.groups > 1:
            keys = keys.repeat_interleave(self.groups, dim=1)
            values = values.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(n, q_len, self.n_heads * self.head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def make_runner(model: Any, *, fast: bool = True, batch_hint: int = 16, reuse: Any = None,
                weight_format: str = "float32"):
    """The fastest runner that supports `model`; `reuse`: a runner whose prepared weights may be
    shared where `model` has the very same tensors (the base of a LoRA version).
    `weight_format` (WEIGHT_FORMATS) needs the Llama runner unless it is float32; AUTO picks
    int4 where the Llama runner serves the model, float32 otherwise."""
    fast = fast and LlamaRunner.supports(model)
    if weight_format == AUTO:
        weight_format = "int4" if fast else "float32"
    activation_dtype(weight_format)  # a clear error for an unknown format
    if fast:
        return LlamaRunner(model, batch_hint, reuse if isinstance(reuse, LlamaRunner) else None, weight_format)
    if weight_format != "float32":
        raise ValueError(
            f"weight format {weight_format} needs the lean Llama runner (a float32 LlamaForCausalLM on "
            f"CPU, fast path on); this model is {type(model).__name__} in {model.dtype}: use float32"
        )
    return TransformersRunner(model)
