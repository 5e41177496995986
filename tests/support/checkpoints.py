"""Checkpoints written from bytes, for tests that need real checkpoint directories (the
registry's, the swap's) without a model to save: the real format, through
`deploy.checkpoint.write_checkpoint`, so hashes, the manifest and the atomic rename are the
product's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.checkpoint import write_checkpoint


def write_files(directory: Path, files: dict[str, bytes], **manifest: Any) -> Path:
    """Create a checkpoint from file contents (relative path -> bytes); returns its directory.
    `manifest`: write_checkpoint's keywords (base_model and kind, optionally checkpoint_id,
    parent_id, config, data_counts, metrics)."""

    def write_payload(staging: Path) -> None:
        for name, content in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)

    write_checkpoint(directory, write_payload, **manifest)
    return Path(directory)
