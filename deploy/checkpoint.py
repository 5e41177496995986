"""The checkpoint format: how a policy is saved, described, verified and loaded.

A checkpoint is a directory:

    <id>/
      manifest.json        what it is (see `Manifest`) and the sha256 of every other file
      adapter_model.safetensors + adapter_config.json     kind "lora" (peft), a few MB
      model.safetensors + config.json + ...               kind "full" (the whole model)
      tokenizer files      optional for "lora" (the base's are used), always for "full"

It is written into a temporary sibling directory and renamed into place, so a reader sees
either no checkpoint or a complete one. Loading verifies every hash first and refuses a
directory with a missing, extra or altered file, so a half-copied or tampered checkpoint can
never serve. Retraining writes through `save_checkpoint`, the server loads through
`load_policy`; the registry (the `checkpoints` table) only records where directories are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Kind = Literal["lora", "full"]
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; subclasses say why, the message says how to fix it."""

    def __init__(self, message: str, *, path: Path | None = None, checkpoint_id: str | None = None):
        super().__init__(message)
        self.path = path
        self.checkpoint_id = checkpoint_id


class CheckpointNotFound(CheckpointError):
    """There is no checkpoint (no directory, or no manifest.json in it)."""


class CheckpointCorrupt(CheckpointError):
    """The manifest is unreadable, or a file is missing, unlisted or does not match its hash."""


class CheckpointExists(CheckpointError):
    """Saving would overwrite an existing checkpoint; checkpoints are immutable."""


class BaseModelMismatch(CheckpointError):
    """A LoRA adapter was trained on another base model than the one it is loaded onto."""


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint is. Written once; every field is JSON."""

    id: str  # unique checkpoint id, also the model version served and recorded on messages
    parent: str | None  # the checkpoint this one was trained from (None: a base model)
    base_model: str  # name of the base model (a "full" base names itself)
    kind: Kind  # "lora": a peft adapter over base_model; "full": complete weights
    config: dict[str, Any] = field(default_factory=dict)  # the training config that produced it
    data_counts: dict[str, int] = field(default_factory=dict)  # e.g. pairs, thumbs, prompts used
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. reward, KL, held-out accuracy
    created: str = ""  # ISO 8601, UTC
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        missing = {"id", "base_model", "kind", "files"} - data.keys()
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        if data["kind"] not in ("lora", "full"):
            raise ValueError(f"kind must be 'lora' or 'full', not {data['kind']!r}")
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"format {data['format']} is newer than this code understands ({FORMAT_VERSION})"
            )
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("files must map each file's relative path to its sha256")
        return cls(**{"parent": None, **{k: v for k, v in data.items() if k in known}})


@dataclass
class Policy:
    """A loaded policy, ready to generate: eval mode, dropout off, no gradients needed."""

    version: str  # the checkpoint id (what `model_version` records)
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel when loaded unmerged
    tokenizer: Any
    manifest: Manifest
    path: Path


def new_checkpoint_id(prefix: str = "ckpt") -> str:
    """Sortable by creation time, unique without coordination."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def checkpoints_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "checkpoints"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[str]:
    """Every file of a checkpoint except its manifest, as sorted POSIX relative paths."""
    manifest = directory / MANIFEST_NAME
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p != manifest
    )


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories (and safetensors 0600 files); a published checkpoint
    should be readable like any other file the user creates (server and trainer may differ)."""
    umask = _current_umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_checkpoint(
    directory: Path,
    write_payload: Callable[[Path], None],
    *,
    checkpoint_id: str | None = None,
    parent_id: str | None = None,
    base_model: str,
    kind: Kind,
    config: dict[str, Any] | None = None,
    data_counts: dict[str, int] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Create checkpoint `directory` atomically: `write_payload(staging)` writes the files,
    then they are hashed, the manifest is added and the directory renamed into place."""
    directory = Path(directory)
    checkpoint_id = checkpoint_id or directory.name
    if not _ID_PATTERN.match(checkpoint_id):
        raise ValueError(
            f"checkpoint id {checkpoint_id!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    if directory.exists():
        raise CheckpointExists(
            f"{directory} already exists; checkpoints are immutable, save under a new id",
            path=directory,
            checkpoint_id=checkpoint_id,
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_payload(staging)
        if (staging / MANIFEST_NAME).exists():
            raise ValueError(f"the payload may not write its own {MANIFEST_NAME}")
        manifest = Manifest(
            id=checkpoint_id,
            parent=parent_id,
            base_model=base_model,
            kind=kind,
            config=dict(config or {}),
            data_counts=dict(data_counts or {}),
            metrics=dict(metrics or {}),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            files={name: sha256_file(staging / name) for name in _payload_files(staging)},
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _publish_permissions(staging)
        os.rename(staging, directory)  # atomic on one filesystem; fails if the target appeared
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved %s checkpoint %s (%d files) at %s", kind, checkpoint_id, len(manifest.files), directory)
    return manifest


def write_files(
    directory: Path,
    files: dict[str, bytes],
    *,
    checkpoint_id: str | None = None,
    parent_id: str | None = None,
    base_model: str,
    kind: Kind,
    config: dict[str, Any] | None = None,
    data_counts: dict[str, int] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Create a checkpoint from file contents (relative path -> bytes); returns its directory.
    For payloads produced without a model object (and for the registry's tests)."""

    def write_payload(staging: Path) -> None:
        for name, content in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)

    write_checkpoint(
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
    return Path(directory)


def registry_fields(manifest: Manifest) -> dict[str, Any]:
    """The manifest as the registry's `checkpoints` columns name it."""
    return {
        "id": manifest.id,
        "parent_id": manifest.parent,
        "base_model": manifest.base_model,
        "kind": manifest.kind,
        "config": manifest.config,
        "metrics": manifest.metrics,
        "data_counts": manifest.data_counts,
        "created": manifest.created,
    }


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


def read_manifest(directory: Path) -> Manifest:
    """The manifest of checkpoint `directory`, without checking the files (cheap)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CheckpointNotFound(
            f"no checkpoint at {directory}: the directory does not exist", path=directory
        )
    if not manifest_path.is_file():
        raise CheckpointNotFound(
            f"{directory} is not a checkpoint: it has no {MANIFEST_NAME} "
            "(checkpoints are written by deploy.checkpoint.save_checkpoint)",
            path=directory,
        )
    try:
        return Manifest.from_dict(json.loads(manifest_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointCorrupt(f"{manifest_path} is unreadable: {error}", path=directory) from error


def verify(directory: Path) -> Manifest:
    """Check every file against the manifest; returns the manifest or raises CheckpointCorrupt."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    started = time.monotonic()
    present = set(_payload_files(directory))
    listed = set(manifest.files)
    problems = []
    if missing := sorted(listed - present):
        problems.append(f"missing files {missing}")
    if unlisted := sorted(present - listed):
        problems.append(f"files not in the manifest {unlisted}")
    for name in sorted(listed & present):
        if sha256_file(directory / name) != manifest.files[name]:
            problems.append(f"{name} does not match its sha256")
    if problems:
        raise CheckpointCorrupt(
            f"checkpoint {manifest.id} at {directory} is corrupt: {'; '.join(problems)}. "
            "Do not edit checkpoints in place: restore the directory from a good copy or save a new one",
            path=directory,
            checkpoint_id=manifest.id,
        )
    log.debug("verified %s (%d files) in %.2f s", manifest.id, len(listed), time.monotonic() - started)
    return manifest


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
        raise CheckpointNotFound(
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


def base_model_name(directory: Path) -> str:
    """How LoRA manifests name a base: its manifest id, else its directory name."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        return read_manifest(directory).id
    return directory.resolve().name


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
