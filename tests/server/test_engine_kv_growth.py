"""After a swap the new version's KV cache starts with the rows the streams need: no growth
4 -> 8 -> 16 (zeroing and copying the cache on the worker while every stream waits) as they
move over."""

from __future__ import annotations

import asyncio

from support.tiny_model import tiny_model_dir  # noqa: F401  (fixture)
from test_engine_local import chat_prompt, make_lora_checkpoint

from server.engine.base import SamplingParams
from server.engine.local import LocalEngineConfig, start_local_engine


async def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_new_version_starts_with_the_rows_in_use(tiny_model_dir, tmp_path):  # noqa: F811
    path = make_lora_checkpoint(tiny_model_dir, tmp_path / "lora-rows")
    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(max_batch_size=32, seed=0))
    try:
        prompt = chat_prompt(engine.tokenizer, "Tell me a long story.")
        long = SamplingParams(temperature=0, max_new_tokens=1024)
        running = [engine.submit(prompt, long) for _ in range(9)]
        await wait_for(lambda: engine.stats().active == 9)
        await engine.load_version("lora-rows", path, make_default=True)
        await wait_for(lambda: "lora-rows" in engine._batches)
        cache = engine._batches["lora-rows"].cache
        assert cache.rows == 16, "9 rows in use: the next power of two, allocated before any stream moved"
        keys = cache.keys
        moved = [engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=8)) for _ in range(9)]
        for generation in moved:
            _, final = await generation.collect()
            assert final.finish_reason == "length"
        assert cache.keys is keys and cache.rows == 16, "never grown on the worker"
        for generation in running:
            generation.cancel()
        # With nothing in use, a version starts small again.
        await wait_for(lambda: engine.stats().active == 0)
        await engine.load_version("lora-idle", path)
        await wait_for(lambda: "lora-idle" in engine._batches)
        assert engine._batches["lora-idle"].cache.rows == 4
    finally:
        await engine.close()
