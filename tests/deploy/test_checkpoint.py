"""The checkpoint format (deploy.checkpoint: manifest, atomic writes, hash verification) and
policies through it (deploy.policy: saving, loading, LoRA adapters)."""

from __future__ import annotations

import json

import pytest
import torch
from support.checkpoints import write_files
from support.tiny_model import tiny_model_dir  # noqa: F401  (fixture)

from deploy.checkpoint import MANIFEST_NAME, new_checkpoint_id, read_manifest, registry_fields, verify
from deploy.errors import BaseModelMismatch, CheckpointCorrupt, CheckpointExists, CheckpointMissing
from deploy.policy import load_adapter, load_base_policy, load_policy, save_checkpoint


@pytest.fixture(scope="module")
def base(tiny_model_dir):  # noqa: F811
    return load_base_policy(tiny_model_dir)


def lora_adapter(base_model, seed: int = 0):
    """A LoRA adapter with random weights (non-zero B), so it changes the model's outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base_model), config)


def logits(model, ids=(1, 2, 3, 4, 5)):
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits


def test_lora_round_trip(base, tiny_model_dir, tmp_path):  # noqa: F811
    adapter = lora_adapter(base.model)
    target = tmp_path / "ck-1"
    manifest = save_checkpoint(
        target, adapter, checkpoint_id="ck-1", parent_id="TinySmolLM2", base_model="TinySmolLM2",
        config={"lr": 1e-5, "kl_coef": 0.05}, data_counts={"pairs": 12, "thumbs": 3},
        metrics={"reward": 0.4},
    )
    assert manifest.kind == "lora" and manifest.parent == "TinySmolLM2"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(manifest.files)
    assert all(len(digest) == 64 for digest in manifest.files.values())
    on_disk = json.loads((target / MANIFEST_NAME).read_text())
    for key in ("id", "parent", "base_model", "kind", "config", "data_counts", "metrics", "created", "files"):
        assert key in on_disk
    assert read_manifest(target) == manifest == verify(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging left behind"

    merged = load_policy(target, base_model_dir=tiny_model_dir)
    unmerged = load_policy(target, base_model=base.model, tokenizer=base.tokenizer, merge=False)
    assert merged.version == "ck-1" and merged.manifest == manifest
    assert not merged.model.training
    torch.testing.assert_close(logits(merged.model), logits(adapter.eval()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(unmerged.model), logits(adapter), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(merged.model), logits(base.model)), "the adapter matters"
    # Merged onto an in-memory base (the serving one): the base is never changed, and the
    # policy shares every tensor the adapter does not touch.
    before = logits(base.model)
    shared = load_policy(target, base_model=base.model, tokenizer=base.tokenizer)
    torch.testing.assert_close(logits(shared.model), logits(adapter), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(base.model), before)
    torch.testing.assert_close(before, logits(load_base_policy(tiny_model_dir).model))
    base_layer, shared_layer = base.model.model.layers[0], shared.model.model.layers[0]
    assert shared_layer.mlp.up_proj.weight.data_ptr() == base_layer.mlp.up_proj.weight.data_ptr()
    assert shared_layer.self_attn.q_proj.weight.data_ptr() != base_layer.self_attn.q_proj.weight.data_ptr()
    assert all(m.p == 0 for m in unmerged.model.modules() if isinstance(m, torch.nn.Dropout))


def test_full_round_trip_keeps_the_tokenizer(base, tmp_path):
    target = tmp_path / "full-1"
    save_checkpoint(target, base.model, tokenizer=base.tokenizer, base_model="TinySmolLM2")
    manifest = verify(target)
    assert manifest.kind == "full" and manifest.id == "full-1" and manifest.parent is None
    policy = load_policy(target)
    torch.testing.assert_close(logits(policy.model), logits(base.model))
    assert policy.tokenizer.chat_template == base.tokenizer.chat_template


def test_a_peft_model_saved_as_full_is_merged(base, tmp_path):
    adapter = lora_adapter(base.model, seed=3)
    save_checkpoint(tmp_path / "merged", adapter, kind="full", tokenizer=base.tokenizer, base_model="TinySmolLM2")
    policy = load_policy(tmp_path / "merged")
    torch.testing.assert_close(logits(policy.model), logits(adapter.eval()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damage", ["flip_a_byte", "delete_a_file", "add_a_file", "garble_manifest"])
def test_a_damaged_checkpoint_is_refused(base, tmp_path, damage):
    target = tmp_path / "ck"
    save_checkpoint(target, lora_adapter(base.model), base_model="TinySmolLM2")
    weights = target / "adapter_model.safetensors"
    if damage == "flip_a_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "delete_a_file":
        weights.unlink()
    elif damage == "add_a_file":
        (target / "extra.bin").write_bytes(b"sneaky")
    else:
        (target / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointCorrupt) as raised:
        verify(target)
    assert str(target) in str(raised.value)
    with pytest.raises(CheckpointCorrupt):
        load_policy(target, base_model=base.model, tokenizer=base.tokenizer)


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointMissing, match="does not exist"):
        load_policy(tmp_path / "never-written")
    (tmp_path / "no-manifest").mkdir()
    with pytest.raises(CheckpointMissing, match="manifest.json"):
        verify(tmp_path / "no-manifest")


def test_writes_are_atomic_and_checkpoints_immutable(tmp_path):
    def crash_half_way(staging):
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    from deploy.checkpoint import write_checkpoint

    with pytest.raises(OSError):
        write_checkpoint(tmp_path / "ck", crash_half_way, base_model="B", kind="lora")
    assert list(tmp_path.iterdir()) == [], "a failed write leaves nothing, not even its staging"

    path = write_files(tmp_path / "ck", {"adapter_model.safetensors": b"w", "sub/x.json": b"{}"},
                       parent_id="p", base_model="B", kind="lora", metrics={"kl": 0.1})
    assert set(verify(path).files) == {"adapter_model.safetensors", "sub/x.json"}
    with pytest.raises(CheckpointExists):
        write_files(tmp_path / "ck", {"a": b"b"}, base_model="B", kind="lora")
    fields = registry_fields(read_manifest(path))
    assert fields["id"] == "ck" and fields["parent_id"] == "p" and fields["metrics"] == {"kl": 0.1}


def test_an_adapter_refuses_another_base(base, tiny_model_dir, tmp_path):  # noqa: F811
    target = tmp_path / "ck"
    save_checkpoint(target, lora_adapter(base.model), base_model="SomeOtherBase")
    with pytest.raises(BaseModelMismatch, match="SomeOtherBase"):
        load_policy(target, base_model_dir=tiny_model_dir)


def test_an_adapter_is_read_as_its_factors_without_a_model(base, tiny_model_dir, tmp_path):  # noqa: F811
    """What a server applying adapters itself reads: verified, base checked, A/B per layer."""
    adapter = lora_adapter(base.model, seed=7)
    target = tmp_path / "ck"
    save_checkpoint(target, adapter, base_model="TinySmolLM2")
    read = load_adapter(target, base_model_dir=tiny_model_dir, tokenizer=base.tokenizer)
    assert read.manifest.id == "ck" and read.tokenizer is base.tokenizer
    assert read.lora.scaling == 16 / 4  # lora_alpha / r
    assert set(read.lora.factors) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    }
    a, b = read.lora.factors["model.layers.1.self_attn.v_proj"]
    v_proj = adapter.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(a, v_proj.lora_A["default"].weight.detach())
    torch.testing.assert_close(b, v_proj.lora_B["default"].weight.detach())
    # W + scaling * B @ A is what peft serves.
    q_proj = base.model.model.layers[0].self_attn.q_proj
    a, b = read.lora.factors["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, q_proj.in_features)
    with torch.inference_mode():
        expected = adapter.base_model.model.model.layers[0].self_attn.q_proj.eval()(x)
        torch.testing.assert_close(q_proj(x) + read.lora.scaling * (x @ a.T) @ b.T, expected, rtol=1e-4, atol=1e-4)

    save_checkpoint(tmp_path / "other", lora_adapter(base.model), base_model="SomeOtherBase")
    with pytest.raises(BaseModelMismatch):
        load_adapter(tmp_path / "other", base_model_dir=tiny_model_dir)
    (target / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointCorrupt):
        load_adapter(target, base_model_dir=tiny_model_dir)


def test_ids_are_validated_and_generated_unique(tmp_path):
    with pytest.raises(ValueError):
        write_files(tmp_path / "x", {"a": b"b"}, checkpoint_id="../escape", base_model="B", kind="lora")
    ids = {new_checkpoint_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("ckpt-") for i in ids)


def test_other_adapter_kinds_merge_through_peft(base, tmp_path):
    """DoRA is not a plain LoRA: it takes peft's merge, still never touching the base."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
                        init_lora_weights=False)
    adapter = get_peft_model(copy.deepcopy(base.model), config).eval()
    save_checkpoint(tmp_path / "dora", adapter, base_model="TinySmolLM2")
    assert load_adapter(tmp_path / "dora", base_model_dir=base.path).lora is None, "not plain: no factors"
    before = logits(base.model)
    policy = load_policy(tmp_path / "dora", base_model=base.model, tokenizer=base.tokenizer)
    torch.testing.assert_close(logits(policy.model), logits(adapter), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(base.model), before)
