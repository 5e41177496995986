"""Prompt building with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import pytest
from support.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

from server.prompt import InvalidConversation, PromptTooLong, build_prompt, render


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def conversation(turns: int, words: int = 20) -> list[dict[str, str]]:
    """`turns` question/answer pairs then a final question, each about `words` words long."""
    path = []
    for i in range(turns):
        path.append({"role": "user", "content": f"question {i} " + "why " * words})
        path.append({"role": "assistant", "content": f"answer {i} " + "because " * words})
    path.append({"role": "user", "content": "the newest question?"})
    return path


def test_renders_with_the_chat_template(tokenizer):
    path = conversation(1)
    prompt = build_prompt(path, tokenizer, context_length=2048, max_new_tokens=256)
    assert list(prompt.token_ids) == render(tokenizer, path)
    text = tokenizer.decode(prompt.token_ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its own default
    assert text.endswith("<|im_start|>assistant\n")  # ready for the answer
    assert prompt.dropped_messages == 0 and list(prompt.messages) == path


def test_configured_system_prompt_is_prepended_unless_the_path_has_one(tokenizer):
    prompt = build_prompt(conversation(0), tokenizer, context_length=2048, max_new_tokens=16,
                          system_prompt="You are Flywheel.")
    assert prompt.messages[0] == {"role": "system", "content": "You are Flywheel."}
    own = [{"role": "system", "content": "Be brief."}, *conversation(0)]
    prompt = build_prompt(own, tokenizer, context_length=2048, max_new_tokens=16, system_prompt="You are Flywheel.")
    assert prompt.messages[0]["content"] == "Be brief."
    assert sum(m["role"] == "system" for m in prompt.messages) == 1


def test_truncation_drops_oldest_turns_and_keeps_system_and_newest_question(tokenizer):
    path = [{"role": "system", "content": "SYSTEM RULES"}, *conversation(12)]
    full = len(render(tokenizer, path))
    context_length, max_new_tokens = full // 2 + 100, 100
    prompt = build_prompt(path, tokenizer, context_length=context_length, max_new_tokens=max_new_tokens)

    assert prompt.n_tokens <= context_length - max_new_tokens
    assert prompt.messages[0] == path[0]
    assert prompt.messages[-1] == path[-1]
    assert prompt.messages[1]["role"] == "user", "whole turns are dropped: history opens with a question"
    kept = list(prompt.messages[1:])
    assert kept == path[len(path) - len(kept):], "the kept history is the most recent, in order"
    assert prompt.dropped_messages == len(path) - len(prompt.messages) > 0
    # As much history as fits is kept: one more turn would not fit.
    one_more = [path[0], *path[len(path) - len(kept) - 2:]]
    assert len(render(tokenizer, one_more)) > context_length - max_new_tokens
    assert list(prompt.token_ids) == render(tokenizer, prompt.messages)


def test_newest_question_with_system_prompt_too_long_is_a_clear_error(tokenizer):
    path = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "word " * 600}]
    with pytest.raises(PromptTooLong) as raised:
        build_prompt(path, tokenizer, context_length=512, max_new_tokens=128, system_prompt="Be nice.")
    assert raised.value.budget == 384
    assert raised.value.n_tokens > 384
    assert "fewer new tokens" in str(raised.value)


def test_answers_after_the_newest_question_are_kept(tokenizer):
    # A regenerate after a partial answer, or an assistant prefill: the tail is never dropped.
    path = [*conversation(3), {"role": "assistant", "content": "Partial"}]
    prompt = build_prompt(path, tokenizer, context_length=2048, max_new_tokens=16)
    assert prompt.messages[-2:] == tuple(path[-2:])


@pytest.mark.parametrize(
    "path",
    [
        [],
        [{"role": "assistant", "content": "no question"}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "late system"}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": None}],
    ],
)
def test_malformed_paths_are_refused(tokenizer, path):
    with pytest.raises(InvalidConversation):
        build_prompt(path, tokenizer, context_length=2048, max_new_tokens=16)
