"""Shared by the deploy tests: a database of one's own, and checkpoints to register.

The registry holds global facts (one serving policy, one canary, one pin), so deploy tests
use a module database emptied before each test (RESET_SQL) rather than the shared one.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
from support.checkpoints import write_files

from deploy import registry

ACTOR = "tester@test"

# deploy_state's FK to checkpoints empties it too; its single row is put back.
RESET_SQL = """
    TRUNCATE checkpoints, checkpoint_events, deploy_state, engine_endpoint_events, users CASCADE;
    INSERT INTO deploy_state (id) VALUES (true);
"""


def fake_model_dir(root: Path, name: str = "TinyBase") -> Path:
    """Enough of a Hugging Face model directory for the registry (it never loads weights)."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def add_base(conn: psycopg.Connection, root: Path) -> registry.Checkpoint:
    return registry.register_base(conn, fake_model_dir(root), actor=ACTOR)


def write_checkpoint(root: Path, *, parent: str | None, metrics: dict[str, Any] | None = None) -> Path:
    """A small LoRA checkpoint directory in the real on-disk format (deploy.checkpoint)."""
    checkpoint_id = f"ck-{uuid.uuid4().hex[:10]}"
    files = {
        "adapter_config.json": json.dumps({"r": 4, "peft_type": "LORA"}).encode(),
        "adapter_model.safetensors": uuid.uuid4().bytes * 16,
    }
    return write_files(
        root / checkpoint_id, files, checkpoint_id=checkpoint_id, parent_id=parent,
        base_model="TinyBase", kind="lora", config={"lr": 1e-5}, metrics=metrics or {},
    )


def add_candidate(
    conn: psycopg.Connection,
    root: Path,
    *,
    parent: str | None,
    metrics: dict[str, Any] | None = None,
    register: bool = True,
):
    """Write a checkpoint and register it (or only write it: register=False returns its path)."""
    path = write_checkpoint(root, parent=parent, metrics=metrics)
    if not register:
        return path
    return registry.register(conn, path, actor=ACTOR)


def corrupt(path: Path) -> None:
    """Flip the weights' bytes so the manifest's sha256 no longer matches."""
    weights = next(p for p in Path(path).iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
