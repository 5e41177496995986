"""The local engine on the tiny model: streaming, batching, cancellation, stops, versions.

Greedy outputs are checked against transformers' own `generate` on the same weights, so the
batched KV cache, masks, positions, padding and chunked prefill are all held to the reference.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from pydantic import ValidationError
from support.tiny_model import reference_greedy, tiny_engine, tiny_model_dir  # noqa: F401  (fixtures)

from deploy.policy import load_base_policy, save_checkpoint
from server.engine.base import (
    EngineOverloaded,
    InvalidSamplingParams,
    SamplingParams,
    TokenEvent,
    UnknownModelVersion,
    VersionInUse,
)
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.local import LocalEngine, LocalEngineConfig, start_local_engine
from server.engine.sampling import sample_tokens
from server.prompt import Prompt, build_prompt

GREEDY = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=12)


def chat_prompt(tokenizer, text: str) -> Prompt:
    return build_prompt([{"role": "user", "content": text}], tokenizer, context_length=2048, max_new_tokens=64)


async def collect(generation):
    tokens, final = [], None
    async for event in generation:
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            final = event
    return tokens, final


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):  # noqa: F811
    return load_base_policy(tiny_model_dir).model


async def test_streams_deltas_that_match_transformers_greedy(tiny_engine, reference_model):  # noqa: F811
    prompt = chat_prompt(tiny_engine.tokenizer, "What is the capital of France?")
    generation = tiny_engine.submit(prompt, GREEDY)
    assert generation.model_version == tiny_engine.default_version == "TinySmolLM2"
    events, final = await collect(generation)

    expected = reference_greedy(reference_model, prompt, GREEDY.max_new_tokens)
    assert final.finish_reason == "length"
    assert final.usage.prompt_tokens == len(prompt.token_ids)
    assert final.usage.completion_tokens == GREEDY.max_new_tokens
    assert "".join(e.text for e in events) == tiny_engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(events) > 1, "tokens are streamed as produced, not in one piece"
    assert [e.completion_tokens for e in events] == sorted(e.completion_tokens for e in events)


async def test_greedy_is_deterministic(tiny_engine):  # noqa: F811
    prompt = chat_prompt(tiny_engine.tokenizer, "Tell me a story.")
    first, _ = await tiny_engine.submit(prompt, GREEDY).collect()
    second, _ = await tiny_engine.submit(prompt, GREEDY).collect()
    assert first == second


async def test_sixteen_concurrent_streams_complete_in_batched_steps(tiny_engine, reference_model):  # noqa: F811
    before = tiny_engine.stats()
    prompts = [chat_prompt(tiny_engine.tokenizer, f"Question number {i}: " + "why? " * i) for i in range(16)]
    generations = [tiny_engine.submit(p, GREEDY) for p in prompts]
    results = await asyncio.gather(*(g.collect() for g in generations))

    after = tiny_engine.stats()
    assert all(final.finish_reason == "length" for _, final in results)
    batch_sizes = after.decode_batch_sizes - before.decode_batch_sizes
    assert max(batch_sizes) > 1, f"decode steps were not batched: {dict(batch_sizes)}"
    # Different prompt lengths share a batch (padding, masks, positions): each answer is still
    # exactly what the model gives that prompt alone.
    for prompt, (text, _) in zip(prompts[::5], results[::5]):
        expected = reference_greedy(reference_model, prompt, GREEDY.max_new_tokens)
        assert text == tiny_engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert after.active == 0 and after.waiting == 0


async def test_chunked_prefill_matches_one_pass(tiny_model_dir, reference_model):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(max_prefill_tokens=16))
    try:
        long_prompt = chat_prompt(engine.tokenizer, "Summarise this: " + "the quick brown fox " * 20)
        short_prompt = chat_prompt(engine.tokenizer, "Hi")
        assert len(long_prompt.token_ids) > 4 * 16
        results = await asyncio.gather(
            engine.submit(long_prompt, GREEDY).collect(), engine.submit(short_prompt, GREEDY).collect()
        )
        for prompt, (text, final) in zip([long_prompt, short_prompt], results):
            expected = reference_greedy(reference_model, prompt, GREEDY.max_new_tokens)
            assert text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert engine.stats().prefill_tokens == len(long_prompt.token_ids) + len(short_prompt.token_ids)
    finally:
        await engine.close()


async def test_cancel_frees_the_slot_within_a_step(tiny_model_dir):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(max_batch_size=1))
    try:
        prompt = chat_prompt(engine.tokenizer, "Go on forever.")
        long_running = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=1000))
        queued = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=3))
        seen = 0
        async for event in long_running:
            if isinstance(event, TokenEvent):
                seen = event.completion_tokens
                if seen >= 3:
                    long_running.cancel()
            else:
                final = event
        assert final.finish_reason == "cancelled"
        assert final.usage.completion_tokens <= seen + 2, "the slot was freed at the next step"
        # The only slot went to the queued request, which now completes.
        _, queued_final = await asyncio.wait_for(queued.collect(), 30)
        assert queued_final.finish_reason == "length"
        assert engine.stats().active == 0
        assert engine.in_flight() == 0
    finally:
        await engine.close()


async def test_leaving_the_stream_cancels(tiny_engine):  # noqa: F811
    prompt = chat_prompt(tiny_engine.tokenizer, "Keep talking.")
    generation = tiny_engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=1000))
    async with generation:
        async for event in generation:
            break
    for _ in range(200):
        if generation.done:
            break
        await asyncio.sleep(0.01)
    assert generation.final.finish_reason == "cancelled"


async def test_stops_at_end_of_turn_without_emitting_it(tiny_model_dir, monkeypatch):  # noqa: F811
    import server.engine.local as local

    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig())
    end_of_turn = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    picks = {"n": 0}
    real_sample = local.sample_tokens

    def model_says_end_of_turn_as_fourth_token(logits, *args):
        picks["n"] += 1
        tokens = real_sample(logits, *args)
        return [end_of_turn] * len(tokens) if picks["n"] == 4 else tokens

    monkeypatch.setattr(local, "sample_tokens", model_says_end_of_turn_as_fourth_token)
    try:
        prompt = chat_prompt(engine.tokenizer, "Say three words.")
        text, final = await engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=50)).collect()
        assert final.finish_reason == "stop"
        assert final.usage.completion_tokens == 4  # three tokens of text, then <|im_end|>
        assert "<|im_end|>" not in text and text
    finally:
        await engine.close()


async def test_sampling_params_are_bounded(tiny_engine):  # noqa: F811
    prompt = chat_prompt(tiny_engine.tokenizer, "Hello")
    # Values no engine can use are not even params (the one type, from the wire on, refuses them).
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(max_new_tokens=0), dict(temperature=float("nan")),
                dict(top_p=1.5), dict(max_new_tokens="4"), dict(max_new_tokens=True)):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    # Values over the engine's limits are refused at submit.
    for bad in (SamplingParams(temperature=50.0), SamplingParams(max_new_tokens=10**6)):
        with pytest.raises(InvalidSamplingParams):
            tiny_engine.submit(prompt, bad)
    with pytest.raises(UnknownModelVersion):
        tiny_engine.submit(prompt, GREEDY, version="no-such-version")


async def test_sampled_answers_finish(tiny_engine):  # noqa: F811
    prompt = chat_prompt(tiny_engine.tokenizer, "Hello")
    generations = [tiny_engine.submit(prompt, SamplingParams(temperature=t, top_p=p, max_new_tokens=8))
                   for t, p in [(0.2, 0.9), (1.0, 1.0), (2.0, 0.5)]]
    for _, final in await asyncio.gather(*(g.collect() for g in generations)):
        assert final.finish_reason in ("stop", "length")


async def test_overload_is_refused_at_submit(tiny_model_dir):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(max_batch_size=1, max_waiting=1))
    try:
        prompt = chat_prompt(engine.tokenizer, "Hello")
        running = [engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=200)) for _ in range(2)]
        with pytest.raises(EngineOverloaded):
            engine.submit(prompt, GREEDY)
        for generation in running:
            generation.cancel()
            await generation.collect()
    finally:
        await engine.close()


def make_lora_checkpoint(base_dir, target, targets=("q_proj", "v_proj", "down_proj"), seed=1):
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the answers."""
    from peft import LoraConfig, get_peft_model

    base = load_base_policy(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=list(targets), init_lora_weights=False)
    adapter = get_peft_model(base.model, config)
    save_checkpoint(target, adapter, checkpoint_id=target.name, parent_id="TinySmolLM2",
                    base_model="TinySmolLM2", config={"lora_rank": 8})
    return target


async def test_two_versions_serve_side_by_side(tiny_model_dir, reference_model, tmp_path):  # noqa: F811
    from deploy.policy import load_policy

    adapter_dir = make_lora_checkpoint(tiny_model_dir, tmp_path / "tiny-lora-1")
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig())
    try:
        await engine.load_version("tiny-lora-1", adapter_dir)
        assert set(engine.versions()) == {"TinySmolLM2", "tiny-lora-1"}
        prompt = chat_prompt(engine.tokenizer, "Which version are you?")
        old = engine.submit(prompt, GREEDY)  # the default: the base
        new = engine.submit(prompt, GREEDY, version="tiny-lora-1")
        assert (old.model_version, new.model_version) == ("TinySmolLM2", "tiny-lora-1")
        (old_text, _), (new_text, _) = await asyncio.gather(old.collect(), new.collect())

        adapted = load_policy(adapter_dir, base_model_dir=tiny_model_dir).model
        decode = engine.tokenizer.decode
        assert old_text == decode(reference_greedy(reference_model, prompt, 12), skip_special_tokens=True)
        assert new_text == decode(reference_greedy(adapted, prompt, 12), skip_special_tokens=True)
        assert old_text != new_text

        # Swap: new requests get the adapter; the base drains and unloads.
        in_flight = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=40))
        engine.set_default_version("tiny-lora-1")
        with pytest.raises(VersionInUse):
            await engine.unload_version("tiny-lora-1")
        after_swap = engine.submit(prompt, GREEDY)
        assert after_swap.model_version == "tiny-lora-1"
        await engine.unload_version("TinySmolLM2")  # waits for in_flight
        assert in_flight.done and in_flight.final.finish_reason == "length"
        assert engine.versions() == ["tiny-lora-1"]
        with pytest.raises(UnknownModelVersion):
            engine.submit(prompt, GREEDY, version="TinySmolLM2")
        assert (await after_swap.collect())[0] == new_text
    finally:
        await engine.close()


async def test_failed_load_keeps_serving(tiny_engine, tmp_path):  # noqa: F811
    from deploy.errors import CheckpointMissing

    with pytest.raises(CheckpointMissing):
        await tiny_engine.load_version("ghost", tmp_path / "nothing-here")
    prompt = chat_prompt(tiny_engine.tokenizer, "Still there?")
    _, final = await tiny_engine.submit(prompt, GREEDY).collect()
    assert final.finish_reason == "length"
    assert "ghost" not in tiny_engine.versions()


def test_detokenizer_never_splits_a_character(tiny_model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Déjà vu: 東京タワー 🗼🇫🇷 naïve café — ok!\n  indented"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5


def test_sampling_rules():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, [0.0, 0.0], [1.0, 1.0], generator) == [1, 0]
    # A tiny nucleus is the most likely token alone, whatever the temperature.
    for _ in range(20):
        assert sample_tokens(logits, [2.0, 2.0], [1e-6, 1e-6], generator) == [1, 0]
    # A wide one reaches the second-best token sometimes.
    seen = {sample_tokens(logits, [1.0, 1.0], [0.99, 0.99], generator)[0] for _ in range(200)}
    assert {1, 2} <= seen
    # The nucleus is exact beyond the fast top-k too (a flat distribution over many tokens).
    flat = torch.zeros(1, 5000)
    picks = {sample_tokens(flat, [1.0], [0.9], generator)[0] for _ in range(200)}
    assert max(picks) > 256


def test_lean_llama_forward_matches_transformers(tiny_model_dir):  # noqa: F811
    """The fast runner against transformers' own forward, through the same KV cache: a padded
    prefill of rows of different lengths, then one decode step."""
    from server.engine.kv_cache import SlotKVCache
    from server.engine.runner import LlamaRunner, TransformersRunner

    model = load_base_policy(tiny_model_dir).model
    config = model.config
    outputs = {}
    for runner in (TransformersRunner(model), LlamaRunner(model)):
        cache = SlotKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, torch.float32,
                            max_rows=4, max_tokens=64)
        torch.manual_seed(0)
        lengths = torch.tensor([7, 3, 5])
        width = int(lengths.max())
        ids = torch.randint(3, 1000, (3, width))
        pad = width - lengths
        columns = torch.arange(width)[None, :]
        positions = (columns - pad[:, None]).clamp(min=0)
        writes = torch.where(columns >= pad[:, None], positions, cache.sink)
        mask = (torch.arange(width)[None, None, :] <= positions[:, :, None])[:, None]
        with torch.inference_mode():
            prefill = runner.forward(ids, positions, mask, cache.prefill_view(torch.arange(3), writes, width))
            step = lengths.clone()
            decode_mask = (torch.arange(width + 1)[None, :] <= step[:, None])[:, None, None]
            decode = runner.forward(prefill.argmax(-1)[:, None], step[:, None], decode_mask,
                                    cache.decode_view(3, step, width + 1))
        outputs[runner.name] = (prefill, decode)
    for fast, reference in zip(outputs["llama"], outputs["transformers"]):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


async def test_generic_forward_serves_the_same_answers(tiny_model_dir, tiny_engine):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(fast_path=False))
    try:
        prompts = [chat_prompt(engine.tokenizer, text) for text in ("One", "Two words", "Three more words")]
        generic = await asyncio.gather(*(engine.submit(p, GREEDY).collect() for p in prompts))
        assert type(engine._batches["TinySmolLM2"].runner).__name__ == "TransformersRunner"
        fast = await asyncio.gather(*(tiny_engine.submit(p, GREEDY).collect() for p in prompts))
        assert [text for text, _ in generic] == [text for text, _ in fast]
    finally:
        await engine.close()


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_forward(runner, config):
    """One padded prefill and one decode step through `runner` (fixed inputs)."""
    from server.engine.kv_cache import SlotKVCache

    cache = SlotKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                        getattr(runner, "dtype", torch.float32), max_rows=4, max_tokens=64)
    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).expand(2, 6)
    mask = (torch.arange(6)[None, None, :] <= positions[:, :, None])[:, None]
    with torch.inference_mode():
        prefill = runner.forward(ids, positions, mask, cache.prefill_view(torch.arange(2), positions, 6))
        step = torch.tensor([6, 6])
        decode_mask = (torch.arange(7)[None, :] <= step[:, None])[:, None, None]
        # A fixed next token, not the argmax: a near-tie that rounding flips would feed the two
        # runners different tokens and compare unrelated logits.
        next_ids = torch.tensor([[17], [423]])
        decode = runner.forward(next_ids, step[:, None], decode_mask, cache.decode_view(2, step, 7))
    return prefill, decode


def test_an_adapter_applied_on_the_fly_matches_merged_weights(tiny_model_dir, tmp_path):  # noqa: F811
    """The LoRA runner shares every base weight and adds x A^T B^T: the same logits as the
    merged model, and the same again once merged into the runner's own weights."""
    from deploy.policy import load_adapter, load_policy
    from server.engine.runner import LlamaRunner

    base = load_base_policy(tiny_model_dir)
    base_runner = LlamaRunner(base.model)
    for targets in (("q_proj", "v_proj", "down_proj"), ALL_PROJECTIONS):
        path = make_lora_checkpoint(tiny_model_dir, tmp_path / f"lora-{len(targets)}", targets)
        lora = load_adapter(path, base_model_dir=tiny_model_dir).lora
        adapted = base_runner.with_adapter(lora.factors, lora.scaling)
        assert adapted.adapted and adapted.head is base_runner.head
        assert adapted.layers[0].qkv.base is base_runner.layers[0].qkv, "the base's packed weights, shared"
        reference = LlamaRunner(load_policy(path, base_model_dir=tiny_model_dir).model)
        expected = run_forward(reference, base.model.config)
        for runner in (adapted, adapted.merged()):
            for got, want in zip(run_forward(runner, base.model.config), expected):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not adapted.merged().adapted
    base_logits = run_forward(base_runner, base.model.config)
    assert not torch.allclose(base_logits[0], expected[0]), "the adapter matters"
    # The base runner is untouched by the versions built on it.
    fresh = run_forward(LlamaRunner(base.model), base.model.config)
    for got, want in zip(base_logits, fresh):
        torch.testing.assert_close(got, want)
    # An adapter on the output head is not the runner's to apply: the engine merges those.
    a, b = torch.zeros(8, 64), torch.zeros(49152, 8)
    assert base_runner.with_adapter({"lm_head": (a, b)}, 1.0) is None


async def test_a_lora_version_loads_without_copying_the_model(tiny_model_dir, reference_model, tmp_path):  # noqa: F811
    """A LoRA version is the base runner plus its adapter (no weight copied), serving at once;
    with merge_adapters it is folded in afterwards, in the background, with the same answers."""
    from deploy.policy import load_policy

    path = make_lora_checkpoint(tiny_model_dir, tmp_path / "lora-all", ALL_PROJECTIONS, seed=3)
    adapted = load_policy(path, base_model_dir=tiny_model_dir).model
    for merge in (False, True):
        engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(merge_adapters=merge))
        try:
            base_runner = engine._base_runner
            await engine.load_version("lora-all", path, make_default=True)
            prompt = chat_prompt(engine.tokenizer, "Which version are you?")
            expected = engine.tokenizer.decode(reference_greedy(adapted, prompt, 12), skip_special_tokens=True)
            text, _ = await engine.submit(prompt, GREEDY).collect()
            assert text == expected
            runner = engine._batches["lora-all"].runner  # the worker has it: it answered
            assert runner.embed is base_runner.embed and runner.head is base_runner.head
            if merge:
                for _ in range(200):
                    if not engine._merging and not engine._batches["lora-all"].runner.adapted:
                        break
                    await asyncio.sleep(0.05)
                merged = engine._batches["lora-all"].runner
                assert not merged.adapted and merged.layers[0].qkv.packed is not base_runner.layers[0].qkv.packed
                assert (await engine.submit(prompt, GREEDY).collect())[0] == expected
            else:
                assert runner.adapted and not engine._merging
        finally:
            await engine.close()


async def test_a_rollback_to_the_base_reuses_its_weights(tiny_model_dir, tmp_path):  # noqa: F811
    path = make_lora_checkpoint(tiny_model_dir, tmp_path / "lora-1")
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig())
    try:
        base_runner = engine._base_runner
        await engine.load_version("lora-1", path, make_default=True)
        await engine.unload_version("TinySmolLM2")
        assert engine.versions() == ["lora-1"]
        await engine.load_version("TinySmolLM2", engine._base.path, make_default=True)
        prompt = chat_prompt(engine.tokenizer, "Back to the base?")
        _, final = await engine.submit(prompt, GREEDY).collect()
        assert final.finish_reason == "length"
        assert engine._batches["TinySmolLM2"].runner is base_runner, "nothing was read again"
    finally:
        await engine.close()


async def test_an_adapter_that_does_not_fit_is_refused(tiny_engine, tmp_path):  # noqa: F811
    """An adapter whose matrices do not fit the base's layers fails to load; what served serves."""
    import io

    from safetensors.torch import save

    from support.checkpoints import write_files

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 100),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4),
    }
    path = write_files(tmp_path / "misfit", {"adapter_config.json": json.dumps(config).encode(),
                                              "adapter_model.safetensors": save(weights)},
                       base_model="TinySmolLM2", kind="lora")
    with pytest.raises(ValueError, match="do not fit"):
        await tiny_engine.load_version("misfit", path)
    assert "misfit" not in tiny_engine.versions()
    _, final = await tiny_engine.submit(chat_prompt(tiny_engine.tokenizer, "Still there?"), GREEDY).collect()
    assert final.finish_reason == "length"


# -- isolation: one request's failure is that request's alone ------------------------------------


async def test_tiny_temperature_or_top_p_decodes_greedily_beside_others(tiny_engine):  # noqa: F811
    """Each of these passed validation once and underflowed in float32 inside the batch's
    sampler (`torch.multinomial` raised), failing every sequence of the batch."""
    prompt = chat_prompt(tiny_engine.tokenizer, "Hello")
    bystanders = [tiny_engine.submit(prompt, SamplingParams(temperature=t, top_p=0.9, max_new_tokens=40))
                  for t in (0, 0.7, 1.0)]
    poisons = [dict(temperature=1e-300), dict(top_p=1e-300), dict(temperature=5e-324), dict(temperature=1e-40)]
    poisoned = [tiny_engine.submit(prompt, SamplingParams(max_new_tokens=40, **p)) for p in poisons]
    assert all(g.params.greedy for g in poisoned), "what the engine computes is greedy"
    results = await asyncio.gather(*(g.collect() for g in bystanders + poisoned))
    assert [final.finish_reason for _, final in results] == ["length"] * 7, [f for _, f in results]
    greedy, _ = await tiny_engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=40)).collect()
    assert all(text == greedy for text, _ in results[3:])


class _RowFaults(LocalEngine):
    """The real engine, with a fault injected where a poisoned sequence's tokens are sampled
    after its first (so it fails mid-decode, in a batch with others): what any per-request
    failure (a bug, a value that slipped through validation) looks like."""

    poisoned: set[str] = set()

    def _sample_rows(self, logits, sequences):
        if any(s.request_id in self.poisoned and s.generated for s in sequences):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return super()._sample_rows(logits, sequences)


async def test_a_failing_row_ends_alone_and_the_batch_goes_on(tiny_model_dir):  # noqa: F811
    engine = _RowFaults(LocalEngineConfig(max_batch_size=8, seed=0))
    await engine.start()
    try:
        await engine.load_base(tiny_model_dir)
        prompt = chat_prompt(engine.tokenizer, "Hello")
        bystanders = [engine.submit(prompt, SamplingParams(temperature=t, top_p=0.9, max_new_tokens=60))
                      for t in (0, 0.7, 1.0)]
        engine.poisoned = {"poisoned"}
        poisoned = engine.submit(prompt, SamplingParams(temperature=0.5, max_new_tokens=60), request_id="poisoned")
        results = await asyncio.gather(*(g.collect() for g in bystanders))
        text, final = await poisoned.collect()
        assert [f.finish_reason for _, f in results] == ["length"] * 3
        assert all(f.usage.completion_tokens == 60 for _, f in results)
        assert final.finish_reason == "error" and final.usage.completion_tokens == 1
        assert "tensor" not in final.error and "sampled" in final.error, final.error
        # The engine keeps serving, the poisoned request's row free again.
        _, after = await engine.submit(prompt, GREEDY).collect()
        assert after.finish_reason == "length" and engine.stats().active == 0
    finally:
        await engine.close()
