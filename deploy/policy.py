"""Policies in and out of checkpoints: saving a model, loading one, and LoRA without peft.

`deploy.checkpoint` owns the directory (manifest, atomic write, verify); this module owns the
model objects on either side of it, so it is the one that imports torch, transformers and
peft. Retraining saves through `save_checkpoint`; the server loads through `load_policy`
(a whole model), `load_base_policy` (the base, with or without a manifest) or `load_adapter`
(a LoRA adapter's factors only, applied on the fly by server/engine/runner.py).

Loading a LoRA checkpoint onto a base that is already in memory (and may be serving) never
mutates it: `_merged_plain_lora` folds a plain adapter in as W + scaling * B @ A on a copy that
shares every tensor except the adapted layers' weights (`_copy_along`), which takes a fraction
of peft's module surgery; any other adapter goes through peft on a copy.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import MANIFEST_NAME, Kind, Manifest, base_model_name, verify, write_checkpoint
from .errors import BaseModelMismatch, CheckpointMissing


@dataclass
class Policy:
    """A loaded policy, ready to generate: eval mode, dropout off, no gradients needed."""

    version: str  # the checkpoint id (what `model_version` records)
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel when loaded unmerged
    tokenizer: Any
    manifest: Manifest
    path: Path


def save_checkpoint(
    directory: Path,
    model: Any,
    *,
    tokenizer: Any = None,
    checkpoint_id: str | None = None,
    parent_id: str | None = None,
    base_model: str,
    kind: Kind | None = None,
    config: dict[str, Any] | None = None,
    data_counts: dict[str, int] | None = None,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Save a policy as a checkpoint.

    `model` is a peft `PeftModel` (kind "lora" by default: only the adapter is saved) or a
    transformers model (kind "full"). A PeftModel saved as "full" is merged first.
    `extra_files` (relative path -> bytes) travel with it, hashed like the rest: e.g. the
    trainer's critic, which the next round starts from.
    """
    is_peft = _is_peft_model(model)
    kind = kind or ("lora" if is_peft else "full")
    if kind == "lora" and not is_peft:
        raise ValueError("kind 'lora' needs a peft PeftModel (an adapter) to save")

    def write_payload(staging: Path) -> None:
        if kind == "lora":
            model.save_pretrained(staging)  # adapter_config.json + adapter_model.safetensors
        else:
            full = _merged_copy(model) if is_peft else model
            full.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            target = staging / name
            if target.exists():
                raise ValueError(f"extra file {name!r} would overwrite the model's own")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)

    return write_checkpoint(
        directory,
        write_payload,
        checkpoint_id=checkpoint_id,
        parent_id=parent_id,
        base_model=base_model,
        kind=kind,
        config=config,
        data_counts=data_counts,
        metrics=metrics,
    )


def load_policy(
    directory: Path,
    *,
    base_model_dir: Path | None = None,
    base_model: Any = None,
    tokenizer: Any = None,
    merge: bool = True,
    dtype: Any = None,
    device: str | None = None,
) -> Policy:
    """Load a verified checkpoint as a ready-to-generate policy.

    A "lora" checkpoint needs its base: `base_model` (an already loaded model, which is copied,
    never modified: it may be serving) or `base_model_dir`; its tokenizer is the checkpoint's
    own if saved, else `tokenizer`, else the base directory's. `merge=True` folds the adapter into
    the weights (fastest to serve); `merge=False` keeps a PeftModel (retraining's reference is
    the same weights with the adapter disabled).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest = verify(directory)
    dtype = dtype or torch.float32
    if manifest.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    else:
        model, tokenizer = _load_lora(directory, manifest, base_model_dir, base_model, tokenizer, merge, dtype)
    if device:
        model.to(device)
    prepare_for_inference(model)
    return Policy(version=manifest.id, model=model, tokenizer=tokenizer, manifest=manifest, path=directory)


def load_base_policy(directory: Path, *, dtype: Any = None, device: str | None = None) -> Policy:
    """Load a base model directory: a verified checkpoint when it has a manifest (the converted
    default), else a plain Hugging Face directory named by `MODEL`, versioned by its name."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        return load_policy(directory, dtype=dtype, device=device)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not directory.is_dir():
        raise CheckpointMissing(
            f"no base model at {directory}: the directory does not exist", path=directory
        )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    if device:
        model.to(device)
    prepare_for_inference(model)
    name = base_model_name(directory)
    manifest = Manifest(id=name, parent=None, base_model=name, kind="full")
    return Policy(version=name, model=model, tokenizer=AutoTokenizer.from_pretrained(directory),
                  manifest=manifest, path=directory)


def prepare_for_inference(model: Any) -> Any:
    """Eval mode and every dropout probability zeroed, so even a later `.train()` (PPO's value
    head, say) samples from the same deterministic policy it was scored with."""
    import torch

    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _load_lora(directory, manifest, base_model_dir, base_model, tokenizer, merge, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base_model is None and base_model_dir is None:
        raise ValueError(f"checkpoint {manifest.id} is a LoRA adapter: pass base_model_dir or base_model")
    if base_model_dir is not None:
        _check_base(manifest, directory, base_model_dir)
    if base_model is None:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype)
        model = PeftModel.from_pretrained(base, directory, is_trainable=False)
        return (model.merge_and_unload() if merge else model), _lora_tokenizer(directory, base_model_dir, tokenizer, manifest)
    # The caller's model may be serving: never mutate it. Merging rewrites only the adapted
    # layers' weights, so the merged policy shares every other tensor with the base (fast to
    # load, small in memory); unmerged, it gets a full copy (a trainer may merge it later).
    if merge and (merged := _merged_plain_lora(base_model, directory)) is not None:
        return merged, _lora_tokenizer(directory, base_model_dir, tokenizer, manifest)
    shared = merge and _adapts_only_linear_layers(directory)
    base = _copy_sharing_tensors(base_model) if shared else copy.deepcopy(base_model)
    # low_cpu_mem_usage: the adapter's layers are created empty and filled from the file,
    # skipping a random initialisation that the loaded weights overwrite anyway.
    model = PeftModel.from_pretrained(base, directory, is_trainable=False, low_cpu_mem_usage=True)
    if shared:
        _unshare_adapted_weights(model)
    if merge:
        model = model.merge_and_unload()
    return model, _lora_tokenizer(directory, base_model_dir, tokenizer, manifest)


def _lora_tokenizer(directory, base_model_dir, tokenizer, manifest):
    from transformers import AutoTokenizer

    if any(directory.glob("tokenizer*")):
        return AutoTokenizer.from_pretrained(directory)
    if tokenizer is not None:
        return tokenizer
    if base_model_dir is not None:
        return AutoTokenizer.from_pretrained(base_model_dir)
    raise ValueError(f"checkpoint {manifest.id} has no tokenizer: pass tokenizer or base_model_dir")


def _adapts_only_linear_layers(directory: Path) -> bool:
    """Whether the adapter touches only Linear layers (not embeddings, which may be tied to
    the output head: un-sharing one would silently untie them)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    names = " ".join(targets) + " " + " ".join(config.get("modules_to_save") or [])
    return config.get("peft_type", "LORA") == "LORA" and "embed" not in names and "lm_head" not in names


_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoraFactors:
    """A plain LoRA adapter as tensors: the Linear layer at each module path (e.g.
    `model.layers.0.self_attn.q_proj`) computes W x + scaling * B (A x), with A [rank, in] and
    B [out, rank] from `factors[path]`."""

    factors: dict[str, tuple[Any, Any]]
    scaling: float  # lora_alpha / r (/ sqrt(r) with rsLoRA)


def read_lora_factors(directory: Path) -> LoraFactors | None:
    """The factors of a plain LoRA adapter (Linear layers only: no DoRA, biases, saved modules
    or per-module ranks), read straight from its safetensors file; None for any other adapter
    (load those with `load_policy`, through peft). Checks nothing: verify first."""
    import math

    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    weights_file = directory / "adapter_model.safetensors"
    plain = (
        config.get("peft_type") == "LORA"
        and not config.get("use_dora")
        and config.get("bias", "none") == "none"
        and not config.get("fan_in_fan_out")
        and not config.get("modules_to_save")
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and weights_file.is_file()
    )
    if not plain:
        return None
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(weights_file).items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            return None
        pairs.setdefault(match[1], {})[match[2]] = tensor
    if any(set(factors) != {"A", "B"} for factors in pairs.values()):
        return None
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraFactors({path: (f["A"], f["B"]) for path, f in pairs.items()}, scaling)


@dataclass(frozen=True)
class Adapter:
    """A verified LoRA checkpoint read without touching any model: for a server that applies
    the adapter on the fly next to the base weights it already holds (server/engine/runner.py)."""

    manifest: Manifest
    path: Path
    lora: LoraFactors | None  # None: not a plain LoRA adapter; load it with `load_policy`
    tokenizer: Any  # the checkpoint's own if saved, else the base's


def load_adapter(directory: Path, *, base_model_dir: Path, tokenizer: Any = None) -> Adapter:
    """Verify LoRA checkpoint `directory` (hashes, and that it was trained on the base at
    `base_model_dir`) and read its factors; costs what the adapter file does, not the model."""
    directory = Path(directory)
    manifest = verify(directory)
    if manifest.kind != "lora":
        raise ValueError(f"checkpoint {manifest.id} is a {manifest.kind} checkpoint, not a LoRA adapter")
    _check_base(manifest, directory, base_model_dir)
    return Adapter(manifest, directory, read_lora_factors(directory),
                   _lora_tokenizer(directory, base_model_dir, tokenizer, manifest))


def _check_base(manifest: Manifest, directory: Path, base_model_dir: Path) -> None:
    found = base_model_name(base_model_dir)
    if found != manifest.base_model:
        raise BaseModelMismatch(
            f"checkpoint {manifest.id} is an adapter for base model {manifest.base_model!r}, "
            f"but {base_model_dir} is {found!r}: set MODEL to the base it was trained on",
            path=directory,
            checkpoint_id=manifest.id,
        )


def _merged_plain_lora(base_model: Any, directory: Path) -> Any | None:
    """The base with a plain LoRA adapter folded in: W + scaling * B @ A, as peft merges it,
    without peft's module surgery (which takes seconds). Only the adapted layers get new
    weights; every other tensor is the base's. None for any other adapter: peft handles those."""
    import torch

    lora = read_lora_factors(directory)
    if lora is None:
        return None
    try:
        model = _copy_along(base_model, list(lora.factors))
    except KeyError:  # the adapter names a layer this model does not have
        return None
    for path, (a, b) in lora.factors.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, torch.nn.Linear):
            return None
        weight = layer.weight.detach()
        delta = b.to(weight.dtype) @ a.to(weight.dtype)
        layer.weight = torch.nn.Parameter(weight + delta * lora.scaling, requires_grad=False)  # a new tensor
    return model


def _copy_along(model: Any, paths: list[str]) -> Any:
    """A copy of `model` in which only the modules on the way to each of `paths` are new
    objects (so their children and tensors can be replaced); everything else is shared."""
    copies: dict[int, Any] = {}

    def private(module):
        if id(module) not in copies:
            clone = copy.copy(module)
            clone._modules = dict(module._modules)
            clone._parameters = dict(module._parameters)
            clone._buffers = dict(module._buffers)
            copies[id(module)] = clone
        return copies[id(module)]

    root = private(model)
    for path in paths:
        parent = root
        for name in path.split("."):
            child = private(parent._modules[name])
            parent._modules[name] = child
            parent = child
    return root


def _copy_sharing_tensors(model: Any) -> Any:
    """A copy of the module tree whose parameters and buffers are the original tensors."""
    import itertools

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _unshare_adapted_weights(peft_model: Any) -> None:
    """Give each adapted layer a private weight, so merging the adapter leaves the base alone."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            if getattr(layer, "bias", None) is not None:
                layer.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _merged_copy(peft_model: Any) -> Any:
    """A full model with the adapter folded in, leaving the trainer's PeftModel untouched."""
    return copy.deepcopy(peft_model).merge_and_unload()
