"""Checkpoint directories and model configs: exact round trips and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import checkpoint, models
from core.config import ModelConfig
from core.errors import DeviceError, ModelError, ModelNotFound


def test_save_load_round_trip_is_exact(model_dir, model):
    loaded = checkpoint.load(str(model_dir), device="cpu")
    assert loaded.config == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert not loaded.model.training


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_tensor_is_named(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    state = load_file(str(broken / "model.safetensors"))
    del state["decoder.1.ffn.fc2.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ModelError, match="lacks tensor.*decoder.1.ffn.fc2.weight"):
        checkpoint.load(str(broken), device="cpu")


def test_shape_mismatch_is_named(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["d_ff"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"ffn.fc1.bias has shape \[64\] but config.json implies \[128\]"):
        checkpoint.load(str(broken), device="cpu")


def test_truncated_weights_are_a_clear_error(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        checkpoint.load(str(broken), device="cpu")


def test_missing_file_is_named(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json is missing"):
        checkpoint.load(str(broken), device="cpu")


def test_unknown_name_suggests_close_ones(monkeypatch, tmp_path, model_dir):
    root = tmp_path / "ckpts"
    root.mkdir()
    copy_dir(model_dir, root / "en-de")
    monkeypatch.setattr(models, "checkpoints_dir", lambda: root)
    assert models.resolve("en-de") == root / "en-de"
    with pytest.raises(ModelNotFound, match="did you mean en-de"):
        models.resolve("en_de")


def test_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device cpu"):
        checkpoint.pick_device("cuda")
    assert checkpoint.pick_device("auto").type == "cpu"


@pytest.mark.parametrize("bad, message", [
    ({"d_model": 30, "n_heads": 4}, "divisible by n_heads"),
    ({"activation": "tanh"}, "activation must be one of"),
    ({"eos_id": 99}, "outside the vocabulary"),
    ({"vocab_size": 10**12}, "more than this tool loads"),
    ({"n_encoder_layers": 0}, "positive integer"),
])
def test_inconsistent_config_is_rejected(bad, message):
    values = {"vocab_size": 64, "d_model": 32, "n_heads": 4} | bad
    with pytest.raises(ModelError, match=message):
        ModelConfig(**values)


def test_config_json_round_trip_and_missing_field(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, norm_first=True)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    (tmp_path / "bad.json").write_text('{"d_model": 32}')
    with pytest.raises(ModelError, match="missing field vocab_size"):
        ModelConfig.load(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text('{"vocab_size": 64, "d_modle": 32}')
    with pytest.raises(ModelError, match="unknown field.*d_modle"):
        ModelConfig.load(tmp_path / "typo.json")
