"""bench/serve.py's streams: what each simulated user sends."""

import asyncio

from bench import serve


class RecordingTarget(serve.Target):
    """Answers every request with the same two pieces and remembers what it was sent."""

    name = "recording"

    def __init__(self):
        self.sent: list[tuple[int, list[dict]]] = []

    async def stream(self, messages, max_new_tokens, user=0):
        self.sent.append((user, messages))
        for piece in (f"answer {len(self.sent)}", "."):
            yield piece


class Tokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_a_conversation_sends_its_history_and_a_follow_up_each_turn():
    target = RecordingTarget()
    run = asyncio.run(serve.run_streams(target, streams=2, requests_per_stream=3, max_new_tokens=8,
                                        tokenizer=Tokenizer(), conversation=True))
    assert run.requests == 6 and run.failed == 0
    first = [messages for user, messages in target.sent if user == 0]
    assert [len(m) for m in first] == [1, 3, 5]
    assert first[0] == [{"role": "user", "content": serve.PROMPTS[0]}]
    # Each turn is the previous one, its answer as the stream received it, and a follow-up.
    for earlier, later in zip(first, first[1:]):
        assert later[: len(earlier)] == earlier
        assert later[len(earlier)]["role"] == "assistant" and later[len(earlier)]["content"].startswith("answer ")
        assert later[-1] == {"role": "user", "content": later[-1]["content"]} and later[-1]["content"] in serve.FOLLOW_UPS


def test_without_conversation_every_request_is_a_new_prompt():
    target = RecordingTarget()
    asyncio.run(serve.run_streams(target, streams=2, requests_per_stream=2, max_new_tokens=8, tokenizer=Tokenizer()))
    assert all(len(messages) == 1 for _, messages in target.sent)
    assert {messages[0]["content"] for _, messages in target.sent} == set(serve.PROMPTS[:4])


def test_each_server_format_gets_its_ratios_against_the_peers_of_its_pass():
    def run(system, streams, repeat, tokens_per_s):
        result = serve.RunResult(system=system, streams=streams, requests=1, failed=0, wall_s=1.0, tokens=1,
                                 tokens_per_s=tokens_per_s, ttft_p50_ms=1, ttft_p95_ms=1, itl_p50_ms=1,
                                 itl_p95_ms=1, cpu_s=None, tokens_per_cpu_s=None, load_start=0, load_end=0)
        result.repeat = repeat
        return result

    runs = [run("server", 1, 1, 10.0), run("server-int4", 1, 1, 20.0), run("llama-server", 1, 1, 40.0),
            run("llama-server", 1, 2, 80.0), run("server", 1, 2, 20.0)]
    ratios = {(r["server"], r["repeat"]): r for r in serve.compute_ratios(runs)}
    assert ratios[("server", 1)]["llama-server"] == 0.25
    assert ratios[("server-int4", 1)]["llama-server"] == 0.5
    assert ratios[("server", 2)]["llama-server"] == 0.25  # against pass 2's llama-server, not pass 1's
    assert ("server-int4", 2) not in ratios
