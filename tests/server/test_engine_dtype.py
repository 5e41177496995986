"""ENGINE_DTYPE on the tiny model: every weight format computes what float32 computes (within
its rounding), generates through the engine, and a LoRA version still swaps in on top of it
(applied on the fly, then merged in the background)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from support.tiny_model import tiny_model_dir  # noqa: F401  (fixture)
from test_engine_local import ALL_PROJECTIONS, GREEDY, chat_prompt, make_lora_checkpoint, run_forward

from deploy.policy import load_adapter, load_base_policy, load_policy
from server.engine.local import LocalEngineConfig, start_local_engine
from server.engine.runner import WEIGHT_FORMATS, LlamaRunner, make_runner
from server.settings import ServerSettings

# Largest relative error (Frobenius norm of the difference over that of float32's) of the
# logits of one prefill and one decode step. Measured on the tiny model: bfloat16 ~0.004 (0.037
# with a large random adapter merged in), int8 ~0.011, int4 ~0.085; the bounds leave room and
# still catch a wrong scale, zero or layout
# (those give errors of order 1).
RELATIVE_ERROR = {"float32": 1e-6, "bfloat16": 0.05, "int8": 0.05, "int4": 0.2}
KERNELS = {"float32": {"packed", "linear"}, "bfloat16": {"linear"}, "int8": {"int8"}, "int4": {"int4"}}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_each_format_computes_float32s_logits(tiny_model_dir, weight_format):  # noqa: F811
    model = load_base_policy(tiny_model_dir).model
    reference = run_forward(LlamaRunner(model), model.config)
    runner = make_runner(model, weight_format=weight_format)
    assert runner.dtype == (torch.float32 if weight_format == "float32" else torch.bfloat16)
    assert {p.kernel for layer in runner.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)} <= KERNELS[
        weight_format
    ]
    # int4 keeps the output projection in 8 bits, as GGUF's 4-bit files do.
    assert runner.head.kernel in KERNELS["int8" if weight_format == "int4" else weight_format]
    for got, want in zip(run_forward(runner, model.config), reference):
        assert got.dtype == torch.float32
        assert relative_error(got, want) < RELATIVE_ERROR[weight_format]
    # The model itself stays float32 (adapters merge into it; retraining reads it).
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
async def test_each_format_generates(tiny_model_dir, weight_format):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(dtype=weight_format, seed=0))
    try:
        prompts = [chat_prompt(engine.tokenizer, text) for text in ("One", "Two words", "Three more words")]
        results = await asyncio.gather(*(engine.submit(p, GREEDY).collect() for p in prompts))
        for text, final in results:
            assert final.finish_reason == "length" and final.usage.completion_tokens == 12 and text
        batch = engine._batches["TinySmolLM2"]
        assert batch.cache.dtype == batch.runner.dtype  # the KV cache holds what the runner computes in
    finally:
        await engine.close()


async def test_a_lora_version_swaps_in_under_bfloat16(tiny_model_dir, tmp_path):  # noqa: F811
    """On the fly first, merged in the background after; both compute the adapted model's
    logits within bfloat16's error, and the merged runner has weights of its own."""
    path = make_lora_checkpoint(tiny_model_dir, tmp_path / "lora-all", ALL_PROJECTIONS, seed=3)
    adapted_model = load_policy(path, base_model_dir=tiny_model_dir).model
    config = adapted_model.config
    expected = run_forward(LlamaRunner(adapted_model), config)
    base_logits = run_forward(LlamaRunner(load_base_policy(tiny_model_dir).model), config)
    assert relative_error(base_logits[0], expected[0]) > 0.5, "the adapter matters"

    for merge in (False, True):
        engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(dtype="bfloat16", merge_adapters=merge))
        try:
            base_runner = engine._base_runner
            prompt = chat_prompt(engine.tokenizer, "Which version are you?")
            base_text, _ = await engine.submit(prompt, GREEDY).collect()
            await engine.load_version("lora-all", path, make_default=True)
            text, final = await engine.submit(prompt, GREEDY).collect()
            assert final.finish_reason == "length" and text != base_text
            if merge:
                for _ in range(400):
                    if not engine._merging and not engine._batches["lora-all"].runner.adapted:
                        break
                    await asyncio.sleep(0.05)
            runner = engine._batches["lora-all"].runner  # the worker has it: it answered
            assert runner.adapted is not merge and runner.dtype == torch.bfloat16
            assert runner.head is base_runner.head
            if merge:  # weights of its own, in the engine's format
                assert runner.layers[0].qkv.weight is not base_runner.layers[0].qkv.weight
                assert runner.layers[0].qkv.weight.dtype == torch.bfloat16
                assert (await engine.submit(prompt, GREEDY).collect())[0] != base_text
            for got, want in zip(run_forward(runner, config), expected):
                assert relative_error(got, want) < RELATIVE_ERROR["bfloat16"]
        finally:
            await engine.close()


# The same with an adapter on every projection, on the fly or merged and quantized again: on
# this random tiny model int4 loses more with it (measured 0.14-0.48; the adapter itself moves
# the logits by 1.3-1.5, so a wrongly applied adapter still fails).
ADAPTED_RELATIVE_ERROR = {"float32": 1e-5, "bfloat16": 0.05, "int8": 0.05, "int4": 0.7}


@pytest.mark.parametrize("weight_format", WEIGHT_FORMATS)
def test_an_adapter_on_each_format_matches_float32(tiny_model_dir, tmp_path, weight_format):  # noqa: F811
    """A base in `weight_format` plus an adapter on the fly, and the adapter merged into the
    float32 master weights then prepared in the format again, against float32 with the adapter
    (at 1/8 of the test adapter's large random scaling: a delta of a trained adapter's size)."""
    model = load_base_policy(tiny_model_dir).model
    path = make_lora_checkpoint(tiny_model_dir, tmp_path / f"lora-{weight_format}", ALL_PROJECTIONS, seed=3)
    lora = load_adapter(path, base_model_dir=tiny_model_dir).lora
    scaling = lora.scaling / 8
    expected = run_forward(LlamaRunner(model).with_adapter(lora.factors, scaling), model.config)
    assert relative_error(run_forward(LlamaRunner(model), model.config)[0], expected[0]) > 1.0, "it matters"
    adapted = make_runner(model, weight_format=weight_format).with_adapter(lora.factors, scaling)
    for runner in (adapted, adapted.merged()):
        for got, want in zip(run_forward(runner, model.config), expected):
            assert relative_error(got, want) < ADAPTED_RELATIVE_ERROR[weight_format]
    if weight_format == "int4":  # on the fly (what the engine serves under int4): the base's error
        for got, want in zip(run_forward(adapted, model.config), expected):
            assert relative_error(got, want) < RELATIVE_ERROR["int4"]


async def test_under_int4_a_lora_version_stays_applied_on_the_fly(tiny_model_dir, tmp_path):  # noqa: F811
    # Merging would quantize base + adapter again on a grid of its own (the base's exact 4-bit
    # grid lost): the engine keeps the adapter on the fly, even with merge_adapters on.
    path = make_lora_checkpoint(tiny_model_dir, tmp_path / "lora-int4", ALL_PROJECTIONS, seed=3)
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(dtype="int4", merge_adapters=True))
    try:
        prompt = chat_prompt(engine.tokenizer, "Which version are you?")
        base_text, _ = await engine.submit(prompt, GREEDY).collect()
        await engine.load_version("lora-int4", path, make_default=True)
        text, _ = await engine.submit(prompt, GREEDY).collect()
        assert text != base_text
        assert not engine._merging
        runner = engine._batches["lora-int4"].runner
        assert runner.adapted and runner.layers[0].qkv.base is engine._base_runner.layers[0].qkv
    finally:
        await engine.close()


async def test_a_quantized_format_needs_the_llama_runner(tiny_model_dir):  # noqa: F811
    with pytest.raises(ValueError, match="needs the lean Llama runner"):
        await start_local_engine(tiny_model_dir, LocalEngineConfig(dtype="int8", fast_path=False))
    with pytest.raises(ValueError, match="unknown weight format 'fp16'"):
        make_runner(load_base_policy(tiny_model_dir).model, weight_format="fp16")


def test_auto_is_int4_on_the_llama_runner_and_float32_elsewhere(tiny_model_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("ENGINE_DTYPE", raising=False)
    model = load_base_policy(tiny_model_dir).model
    fast = make_runner(model, weight_format="auto")
    assert fast.weight_format == "int4" and fast.layers[0].qkv.kernel == "int4"
    generic = make_runner(model, fast=False, weight_format="auto")  # any other model: no error
    assert type(generic).__name__ == "TransformersRunner"
    assert ServerSettings(_env_file=None).engine_dtype == "auto"  # what `make run` serves with


def test_engine_dtype_setting(monkeypatch):
    monkeypatch.setenv("ENGINE_DTYPE", "int4")
    assert ServerSettings().engine_dtype == "int4"
    monkeypatch.setenv("ENGINE_DTYPE", "fp16")
    with pytest.raises(ValueError, match="engine_dtype"):
        ServerSettings()


def test_int4_keeps_the_grid_of_weights_that_came_from_a_4_bit_file():
    # Weights as a Q4_1 GGUF stores them: per group of 32, w = d * q + m with float16 d and m,
    # and half the groups not using the extreme levels 0 and 15 (a min/max grid moves every
    # value of those). int4 must multiply with them as well as bfloat16 weights do.
    from server.engine.runner import INT4_GROUP, _quantize_int4

    torch.manual_seed(0)
    out, inputs = 64, 256
    groups = inputs // INT4_GROUP
    d = (torch.rand(out, groups, 1) * 0.02 + 0.001).half().float()
    m = (-8 * d + torch.randn(out, groups, 1) * 0.05).half().float()
    q = torch.randint(0, 16, (out, groups, INT4_GROUP)).float()
    q[:, ::2] = q[:, ::2].clamp(2, 13)
    weight = (d * q + m).view(out, inputs)
    x = torch.randn(8, inputs).bfloat16()
    want = x.float() @ weight.T

    def int4(w):
        packed, scales_and_zeros = _quantize_int4(w)
        return torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)

    as_bfloat16 = relative_error(x @ weight.bfloat16().T, want)
    assert relative_error(int4(weight), want) < 1.5 * as_bfloat16  # measured 1.0x; a min/max grid 10x
    # Weights on no grid get the min/max one: the error of 4 bits, not of a wrong scale or zero.
    noise = torch.randn(out, inputs) * 0.05
    assert relative_error(int4(noise), x.float() @ noise.T) < 0.12  # measured ~0.08

