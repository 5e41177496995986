"""The checkpoint format: how a policy is laid out on disk, described and verified.

A checkpoint is a directory:

    <id>/
      manifest.json        what it is (see `Manifest`) and the sha256 of every other file
      adapter_model.safetensors + adapter_config.json     kind "lora" (peft), a few MB
      model.safetensors + config.json + ...               kind "full" (the whole model)
      tokenizer files      optional for "lora" (the base's are used), always for "full"

It is written into a temporary sibling directory and renamed into place (`write_checkpoint`),
so a reader sees either no checkpoint or a complete one. `verify` checks every hash and
refuses a directory with a missing, extra or altered file, so a half-copied or tampered
checkpoint can never serve. Nothing here imports torch: the registry and the deploy script
work with directories only. Models go in and out through `deploy.policy` (`save_checkpoint`,
`load_policy`), which writes through and verifies with this module; the registry (the
`checkpoints` table) only records where directories are.
"""

from __future__ import annotations

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

from .errors import CheckpointCorrupt, CheckpointExists, CheckpointMissing

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Kind = Literal["lora", "full"]
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_CHUNK = 8 * 1024 * 1024


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


def read_manifest(directory: Path) -> Manifest:
    """The manifest of checkpoint `directory`, without checking the files (cheap)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CheckpointMissing(
            f"no checkpoint at {directory}: the directory does not exist", path=directory
        )
    if not manifest_path.is_file():
        raise CheckpointMissing(
            f"{directory} is not a checkpoint: it has no {MANIFEST_NAME} "
            "(checkpoints are written by deploy.policy.save_checkpoint)",
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


def base_model_name(directory: Path) -> str:
    """How LoRA manifests name a base: its manifest id, else its directory name."""
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists():
        return read_manifest(directory).id
    return directory.resolve().name


