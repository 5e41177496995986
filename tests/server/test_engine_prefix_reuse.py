"""The local engine reuses the KV cache rows requests leave: a conversation's next turn and the
same prompt again prefill only what is new, and every answer is still exactly transformers'
greedy answer to the whole prompt."""

from __future__ import annotations

import asyncio

import pytest
from support.tiny_model import reference_greedy, tiny_model_dir  # noqa: F401  (fixture)

from deploy.policy import load_base_policy
from server.engine.base import SamplingParams
from server.engine.local import LocalEngineConfig, start_local_engine
from server.prompt import build_prompt

GREEDY = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):  # noqa: F811
    return load_base_policy(tiny_model_dir).model


def prompt_of(tokenizer, *turns: str):
    """A prompt from alternating user / assistant turns, the user's first."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return build_prompt(messages, tokenizer, context_length=2048, max_new_tokens=64)


async def answer(engine, prompt, params=GREEDY):
    """The answer's text, and the prompt tokens this request prefilled and reused."""
    before = engine.stats()
    text, final = await engine.submit(prompt, params).collect()
    after = engine.stats()
    assert final.usage.prompt_tokens == len(prompt.token_ids)
    return text, after.prefill_tokens - before.prefill_tokens, after.reused_prompt_tokens - before.reused_prompt_tokens


def expected(engine, model, prompt, max_new_tokens=GREEDY.max_new_tokens) -> str:
    return engine.tokenizer.decode(reference_greedy(model, prompt, max_new_tokens), skip_special_tokens=True)


async def test_the_next_turn_prefills_only_what_is_new(tiny_model_dir, reference_model):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0))
    try:
        first = prompt_of(engine.tokenizer, "Name a colour.")
        reply, prefilled, reused = await answer(engine, first)
        assert (prefilled, reused) == (len(first.token_ids), 0)

        second = prompt_of(engine.tokenizer, "Name a colour.", reply, "And another one?")
        text, prefilled, reused = await answer(engine, second)
        # The row holds the first prompt and the answer's tokens but the last (never fed back);
        # the second prompt shares them as far as the template renders the answer with the
        # same tokens, and only the rest is run through the model.
        held = list(first.token_ids) + reference_greedy(reference_model, first, GREEDY.max_new_tokens)[:-1]
        shared = next((i for i, (x, y) in enumerate(zip(held, second.token_ids)) if x != y), len(held))
        assert shared >= len(first.token_ids) - 1  # the whole first prompt, up to its last newline
        assert (prefilled, reused) == (len(second.token_ids) - shared, shared)
        assert text == expected(engine, reference_model, second)
    finally:
        await engine.close()


async def test_the_same_prompt_again_prefills_one_token(tiny_model_dir, reference_model):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0))
    try:
        prompt = prompt_of(engine.tokenizer, "Why is the sky blue?")
        first, _, _ = await answer(engine, prompt)
        again, prefilled, reused = await answer(engine, prompt)
        assert (prefilled, reused) == (1, len(prompt.token_ids) - 1)
        assert first == again == expected(engine, reference_model, prompt)
        # A sampled regenerate starts from the same cached prefix and still streams its own answer.
        sampled, prefilled, _ = await answer(engine, prompt, SamplingParams(temperature=1.0, max_new_tokens=10))
        assert prefilled == 1 and sampled
    finally:
        await engine.close()


async def test_rows_moved_while_streams_come_and_go_keep_their_prefixes(tiny_model_dir, reference_model):  # noqa: F811
    """Streams finishing at different steps move rows around (the batch stays dense); the rows
    they leave must still hold exactly their tokens when later requests reuse them."""
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0, max_prefill_tokens=64))
    try:
        questions = [f"Question {i}: " + "tell me more " * i for i in range(8)]
        prompts = [prompt_of(engine.tokenizer, q) for q in questions]
        lengths = [3 + 2 * i for i in range(8)]  # each finishes at its own step
        firsts = await asyncio.gather(*(
            engine.submit(p, SamplingParams(temperature=0, max_new_tokens=n)).collect()
            for p, n in zip(prompts, lengths)
        ))
        for prompt, n, (text, _) in zip(prompts, lengths, firsts):
            assert text == expected(engine, reference_model, prompt, n)

        # Second wave, at once and in another order: each conversation's next turn, and one
        # prompt that shares nothing past the template.
        follow_ups = [prompt_of(engine.tokenizer, q, text, "Go on.") for q, (text, _) in zip(questions, firsts)]
        wave = follow_ups[::-1] + [prompt_of(engine.tokenizer, "Something else entirely.")]
        before = engine.stats()
        results = await asyncio.gather(*(engine.submit(p, GREEDY).collect() for p in wave))
        after = engine.stats()
        for prompt, (text, _) in zip(wave, results):
            assert text == expected(engine, reference_model, prompt)
        reused = after.reused_prompt_tokens - before.reused_prompt_tokens
        prefilled = after.prefill_tokens - before.prefill_tokens
        assert reused >= sum(len(p.token_ids) - 1 for p in prompts)  # each first prompt, at least
        assert reused + prefilled == sum(len(p.token_ids) for p in wave)
    finally:
        await engine.close()


async def test_with_no_free_row_left_the_least_recently_left_prefix_goes(tiny_model_dir, reference_model):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0, max_batch_size=2))
    try:
        a, b, c = (prompt_of(engine.tokenizer, t) for t in ("Apples or pears?", "Boats or trains?", "Cats or dogs?"))
        for prompt in (a, b, c):  # two rows: c takes the row a left
            await answer(engine, prompt)
        text, _, reused = await answer(engine, a)
        assert reused < len(a.token_ids) - 1, "a's prefix was evicted for c"
        assert text == expected(engine, reference_model, a)
        text, prefilled, reused = await answer(engine, c)
        assert (prefilled, reused) == (1, len(c.token_ids) - 1), "c, left more recently than b, was kept"
        assert text == expected(engine, reference_model, c)
    finally:
        await engine.close()


async def test_reuse_can_be_turned_off(tiny_model_dir):  # noqa: F811
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0, reuse_prefixes=False))
    try:
        prompt = prompt_of(engine.tokenizer, "Why is the sky blue?")
        await answer(engine, prompt)
        _, prefilled, reused = await answer(engine, prompt)
        assert (prefilled, reused) == (len(prompt.token_ids), 0)
    finally:
        await engine.close()


async def test_an_idle_cache_over_its_keep_size_gives_its_memory_and_prefixes_back(tiny_model_dir):  # noqa: F811
    for keep_mb, kept in ((512, True), (0, False)):
        engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0, kv_cache_keep_mb=keep_mb))
        try:
            prompt = prompt_of(engine.tokenizer, "Why is the sky blue?")
            await answer(engine, prompt)
            _, _, reused = await answer(engine, prompt)
            assert reused == (len(prompt.token_ids) - 1 if kept else 0)
        finally:
            await engine.close()


async def test_the_cache_grows_for_a_new_conversation_rather_than_evict_a_kept_one(tiny_model_dir):  # noqa: F811
    # Five conversations one after the other on a cache that starts with four rows: the fifth
    # gets a new row (the cache is far below its keep size), so all five keep their prefixes.
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(seed=0))
    try:
        prompts = [prompt_of(engine.tokenizer, f"{word} is my favourite word.") for word in
                   ("Apple", "Boat", "Cloud", "Drum", "Engine")]
        for i, prompt in enumerate(prompts):
            await answer(engine, prompt)
            if i == 3:
                assert engine._batches["TinySmolLM2"].cache.rows == 4
        for prompt in prompts:
            _, prefilled, reused = await answer(engine, prompt)
            assert (prefilled, reused) == (1, len(prompt.token_ids) - 1)
        assert engine._batches["TinySmolLM2"].cache.rows == 8
    finally:
        await engine.close()
