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
