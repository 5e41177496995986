"""The remote engine against real `transformers serve` processes on the tiny model.

One server ("blue") is shared by the module; a second ("green") starts for the blue/green
switch and is killed, last, to see a remote die under a stream. Server start-up is most of the
time spent here (tens of seconds on a busy machine); each request takes well under a second.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest
from transformers import AutoTokenizer

from deploy.checkpoint import base_model_name
from remote_testkit import BASE_REPO, TERSE_ANSWER, TERSE_REPO, serve_app, tgi_wire_app
from server.engine.base import (
    EngineNotReady,
    FinalEvent,
    SamplingLimits,
    SamplingParams,
    TokenEvent,
    Usage,
)
from server.engine.remote import (
    ModelNotServed,
    RemoteEngine,
    RemoteEngineConfig,
    RemoteEngineError,
    load_remote_engine,
    start_remote_engine,
)
from server.prompt import Prompt, build_prompt
from server.settings import ServerSettings
from support.tiny_model import tiny_model_dir  # noqa: F401 - the fixture

CONTEXT_LENGTH = 1024


def config_for(url: str, **overrides) -> RemoteEngineConfig:
    values = dict(
        url=url,
        served_model=BASE_REPO,
        context_length=CONTEXT_LENGTH,
        health_interval_s=0.5,
        read_timeout_s=60,
        limits=SamplingLimits(max_new_tokens=900),
    )
    values.update(overrides)
    return RemoteEngineConfig(**values)


@pytest.fixture(scope="module")
async def engine(blue, tiny_model_dir) -> AsyncIterator[RemoteEngine]:  # noqa: F811
    engine = await start_remote_engine(tiny_model_dir, config_for(blue.url))
    yield engine
    await engine.close()


def ask(engine: RemoteEngine, question: str = "What is the capital of France?", max_new_tokens: int = 16) -> Prompt:
    return build_prompt(
        [{"role": "user", "content": question}],
        engine.tokenizer,
        context_length=engine.context_length,
        max_new_tokens=max_new_tokens,
    )


def dead_url() -> str:
    """A localhost URL nothing listens on (a port just freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def answer(engine: RemoteEngine, params: SamplingParams, **submit) -> tuple[str, FinalEvent]:
    return await engine.submit(ask(engine), params, **submit).collect()


GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


async def test_ready_with_the_base_model_as_default_version(engine, blue, tiny_model_dir):  # noqa: F811
    assert engine.ready and engine.problem is None
    assert engine.url == blue.url
    # Named as the local engine names it, so stored messages mean the same policy either way.
    assert engine.default_version == base_model_name(tiny_model_dir)
    assert engine.versions() == [engine.default_version]
    assert engine.context_length == CONTEXT_LENGTH


async def test_streams_tokens_then_length_with_the_remotes_usage(engine, blue):
    prompt = ask(engine)
    generation = engine.submit(prompt, GREEDY)
    assert generation.url == blue.url and generation.model_version == engine.default_version
    events = [event async for event in generation]
    tokens, final = events[:-1], events[-1]
    assert tokens and all(isinstance(event, TokenEvent) and event.text for event in tokens)
    assert [event.completion_tokens for event in tokens] == sorted(event.completion_tokens for event in tokens)
    assert isinstance(final, FinalEvent) and final.finish_reason == "length" and final.error is None
    # The remote rendered the same messages into the same prompt the local tokenizer counted.
    assert final.usage == Usage(prompt_tokens=prompt.n_tokens, completion_tokens=8)
    assert engine.in_flight() == 0


async def test_a_version_is_a_model_the_remote_serves_by_name(engine, tmp_path):
    stats_before = engine.stats()
    await engine.load_version("terse-v1", tmp_path, served_name=TERSE_REPO)
    try:
        assert set(engine.versions()) == {engine.default_version, "terse-v1"}
        text, final = await answer(engine, SamplingParams(max_new_tokens=16), version="terse-v1")
        # The terse model answers one token and ends its turn: a real "stop", whose usage counts
        # the end-of-turn token too.
        assert (text, final.finish_reason) == (TERSE_ANSWER, "stop")
        assert final.usage.completion_tokens == 2
        # The default version is still the base model.
        text, final = await answer(engine, GREEDY)
        assert text != TERSE_ANSWER and final.finish_reason == "length"
    finally:
        await engine.unload_version("terse-v1")
    assert engine.versions() == [engine.default_version]
    stats = engine.stats()
    assert stats.finished["stop"] == stats_before.finished["stop"] + 1
    assert stats.generated_tokens == stats_before.generated_tokens + 2 + 8


async def test_a_version_the_remote_does_not_serve_is_refused(engine, blue, tmp_path):
    with pytest.raises(ModelNotServed) as refused:
        await engine.load_version("ckpt-not-on-the-remote", tmp_path)
    message = str(refused.value)
    assert blue.url in message and "ckpt-not-on-the-remote" in message and BASE_REPO in message
    assert engine.versions() == [engine.default_version]


async def test_sampling_params_reach_the_remote(engine):
    greedy_text, final = await answer(engine, SamplingParams(temperature=0, max_new_tokens=12))
    assert final.usage.completion_tokens == 12  # max_new_tokens went through
    assert (await answer(engine, SamplingParams(temperature=0, max_new_tokens=12)))[0] == greedy_text
    # A nucleus holding only the likeliest token is greedy again, whatever the temperature.
    nucleus_of_one = SamplingParams(temperature=1.0, top_p=0.001, max_new_tokens=12)
    assert (await answer(engine, nucleus_of_one))[0] == greedy_text
    # Sampling hot from a random model's near-flat distribution does not retrace greedy's path.
    hot = SamplingParams(temperature=1.5, top_p=1.0, max_new_tokens=12)
    assert (await answer(engine, hot))[0] != greedy_text


async def test_cancel_ends_the_stream_and_stops_the_remote(engine):
    started = time.monotonic()
    await answer(engine, SamplingParams(temperature=0, max_new_tokens=64))
    seconds_per_token = (time.monotonic() - started) / 64

    long = SamplingParams(temperature=0, max_new_tokens=900)
    generation = engine.submit(ask(engine, max_new_tokens=900), long)
    received = []
    async for event in generation:
        if isinstance(event, TokenEvent):
            received.append(event)
            if len(received) == 3:
                generation.cancel()
        else:
            final = event
    assert final.finish_reason == "cancelled" and final.error is None
    assert final.usage.completion_tokens >= 3
    assert engine.in_flight() == 0
    await wait_until(lambda: engine.open_streams() == 0)  # its HTTP response is closed

    # transformers serve generates one request at a time: had the cancelled one kept running
    # there, the next answer would wait for ~900 tokens.
    started = time.monotonic()
    _, final = await answer(engine, SamplingParams(temperature=0, max_new_tokens=2))
    assert final.finish_reason == "length"
    assert time.monotonic() - started < 0.5 * 900 * seconds_per_token

    # Leaving an `async with` block early cancels too.
    async with engine.submit(ask(engine, max_new_tokens=900), long) as generation:
        async for event in generation:
            break
    assert generation.final.finish_reason == "cancelled"
    await wait_until(lambda: engine.open_streams() == 0)


async def test_concurrent_streams_all_complete(engine):
    stats_before = engine.stats()
    generations = [engine.submit(ask(engine), GREEDY) for _ in range(4)]
    assert engine.in_flight() == 4
    results = await asyncio.gather(*(generation.collect() for generation in generations))
    assert {final.finish_reason for _, final in results} == {"length"}
    assert {final.usage.completion_tokens for _, final in results} == {8}
    assert len({text for text, _ in results}) == 1  # greedy, same prompt: same answer
    stats = engine.stats()
    assert stats.finished["length"] == stats_before.finished["length"] + 4
    assert stats.generated_tokens == stats_before.generated_tokens + 32
    assert stats.active == 0


async def test_hub_offline_mode_does_not_block_a_self_hosted_engine(engine, monkeypatch):
    # HF_HUB_OFFLINE guards against downloads; the hub's own HTTP session would refuse even
    # localhost under it.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _, final = await answer(engine, GREEDY)
    assert final.finish_reason == "length"


async def test_a_dead_url_is_not_ready_and_says_which_url(tiny_model_dir):  # noqa: F811
    url = dead_url()
    engine = await start_remote_engine(tiny_model_dir, config_for(url))
    try:
        assert not engine.ready
        assert url in engine.problem
        with pytest.raises(EngineNotReady, match=url):
            engine.submit(ask(engine), GREEDY)
    finally:
        await engine.close()


async def test_switching_to_a_dead_url_keeps_the_current_one(engine, blue):
    url = dead_url()
    with pytest.raises(RemoteEngineError, match=url):
        await engine.switch_endpoint(url)
    assert engine.url == blue.url and engine.ready and engine.draining_urls() == []


async def test_settings_build_the_engine_and_an_ambiguous_remote_is_explained(blue, tiny_model_dir, tmp_path):  # noqa: F811
    settings = ServerSettings(
        _env_file=None, data_dir=tmp_path, engine="remote", engine_url=f"{blue.url}/v1", model=str(tiny_model_dir)
    )
    engine = await load_remote_engine(settings)
    await engine.start()
    try:
        assert engine.url == blue.url  # the /v1 suffix is the client's business
        # Without ENGINE_MODEL the engine takes the one model the remote lists; this remote
        # lists two, so it says what to set rather than guess.
        assert not engine.ready
        assert "ENGINE_MODEL" in engine.problem and BASE_REPO in engine.problem and TERSE_REPO in engine.problem
    finally:
        await engine.close()


async def test_tgi_flavour_sends_the_rendered_prompt_and_reads_tgis_stream(tiny_model_dir, tmp_path):  # noqa: F811
    app, received = tgi_wire_app(AutoTokenizer.from_pretrained(tiny_model_dir), max_total_tokens=512)
    async with serve_app(app) as url:
        engine = await start_remote_engine(tiny_model_dir, config_for(url, api="tgi", served_model=None))
        try:
            prompt = ask(engine)
            text, final = await engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=16)).collect()
            # The end-of-turn token is special: counted, never shown.
            assert (text, final.finish_reason, final.error) == (TERSE_ANSWER, "stop", None)
            assert final.usage == Usage(prompt_tokens=prompt.n_tokens, completion_tokens=2)
            body = received[-1]
            # The prompt rendered and truncated here, as text: exactly the kept messages' rendering.
            assert engine.tokenizer.encode(body["inputs"], add_special_tokens=False) == list(prompt.token_ids)
            assert body["stream"] is True
            parameters = body["parameters"]
            assert parameters["details"] is True and parameters["max_new_tokens"] == 16
            assert parameters["do_sample"] is False and "temperature" not in parameters and "adapter_id" not in parameters

            # A version is a TGI LoRA adapter id; sampled, with top_p 1 left out (TGI refuses it).
            await engine.load_version("ckpt-lora", tmp_path)
            sampled = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=1)
            _, final = await engine.submit(prompt, sampled, version="ckpt-lora").collect()
            assert final.finish_reason == "length" and final.usage.completion_tokens == 1
            parameters = received[-1]["parameters"]
            assert parameters["adapter_id"] == "ckpt-lora" and parameters["do_sample"] is True
            assert parameters["temperature"] == 0.7 and "top_p" not in parameters

            # TGI's own refusal (its --max-total-tokens is below our context) reaches the client,
            # quoted, with the URL.
            _, final = await engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=900)).collect()
            assert final.finish_reason == "error"
            assert url in final.error and "`max_new_tokens` must be <= 512" in final.error
        finally:
            await engine.close()


async def test_blue_green_switch_keeps_streams_in_flight(blue, green, tiny_model_dir):  # noqa: F811
    engine = await start_remote_engine(tiny_model_dir, config_for(blue.url))
    try:
        blue_before, green_before = blue.chat_requests_received(), green.chat_requests_received()
        params = SamplingParams(temperature=0, max_new_tokens=250)
        old = engine.submit(ask(engine, max_new_tokens=250), params)
        old_events = aiter(old)
        first = await anext(old_events)
        assert isinstance(first, TokenEvent)

        await engine.switch_endpoint(green.url)
        assert not old.done  # it really is in flight across the switch
        assert engine.url == green.url and engine.draining_urls() == [blue.url]
        new = engine.submit(ask(engine, max_new_tokens=250), params)
        assert (old.url, new.url) == (blue.url, green.url)

        old_rest = [event async for event in old_events]
        new_text, new_final = await new.collect()
        old_final = old_rest[-1]
        old_text = first.text + "".join(event.text for event in old_rest[:-1])
        assert old_final.finish_reason == new_final.finish_reason == "length"
        assert old_final.usage.completion_tokens == new_final.usage.completion_tokens == 250
        assert old_text == new_text  # same weights, greedy: nothing lost or repeated on either side
        # Each server's own log: the old stream was blue's, the new one green's.
        assert blue.chat_requests_received() == blue_before + 1
        assert green.chat_requests_received() == green_before + 1
        # Blue's connections are closed once its last stream is over.
        await wait_until(lambda: engine.draining_urls() == [])
        assert engine.ready
    finally:
        await engine.close()


async def test_a_remote_dying_mid_stream_ends_it_with_an_error_naming_it(green, tiny_model_dir):  # noqa: F811
    # Last in the module: it kills green.
    engine = await start_remote_engine(tiny_model_dir, config_for(green.url))
    try:
        generation = engine.submit(ask(engine, max_new_tokens=900), SamplingParams(temperature=0, max_new_tokens=900))
        events = aiter(generation)
        assert isinstance(await anext(events), TokenEvent)
        green.process.kill()
        rest = [event async for event in events]
        final = rest[-1]
        assert final.finish_reason == "error"
        assert green.url in final.error
        await wait_until(lambda: not engine.ready)
        with pytest.raises(EngineNotReady, match=green.url):
            engine.submit(ask(engine), GREEDY)
    finally:
        await engine.close()
