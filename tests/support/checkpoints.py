"""Checkpoints written from bytes, for tests that need real checkpoint directories (the
registry's, the swap's) without a model to save: the real format, through
`deploy.checkpoint.write_checkpoint`, so hashes, the manifest and the atomic rename are the
product's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.checkpoint import Kind, write_checkpoint


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
    """Create a checkpoint from file contents (relative path -> bytes); returns its directory."""

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
