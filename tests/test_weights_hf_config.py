"""fpipe.weights.hf_config: what a model folder's config says that its tensors cannot."""
import types

from fpipe.weights import hf_config

VIT = types.SimpleNamespace(mlp="gelu", ln_eps=1e-6)


def folder(tmp_path, **files):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for name, text in files.items():
        (tmp_path / name.replace("_json", ".json")).write_text(text)
    return str(tmp_path)


def test_a_vit_config_and_a_clip_models_vision_part(tmp_path):
    path = folder(tmp_path, config_json='{"hidden_act": "gelu", "layer_norm_eps": 1e-12}')
    assert hf_config.mismatches(hf_config.read(path), VIT) == [("ln_eps", 1e-12, 1e-6)]
    path = folder(tmp_path, config_json='{"vision_config": {"hidden_act": "quick_gelu"}, "hidden_act": "gelu"}')
    assert hf_config.mismatches(hf_config.read(path), VIT) == [("mlp", "quick_gelu", "gelu")]
    path = folder(tmp_path, config_json='{"use_swiglu_ffn": true, "hidden_act": "gelu", "layer_norm_eps": 1e-6}')
    assert hf_config.mismatches(hf_config.read(path), VIT) == [("mlp", "swiglu", "gelu")]
    path = folder(tmp_path, config_json='{"hidden_act": "gelu_pytorch_tanh"}')
    assert hf_config.mismatches(hf_config.read(path), VIT) == [("mlp", "gelu_tanh", "gelu")]


def test_nothing_to_check_is_no_error(tmp_path):
    assert hf_config.read(str(tmp_path / "missing")) == {}
    assert hf_config.read(folder(tmp_path)) == {}  # no config.json
    assert hf_config.read(folder(tmp_path, config_json="[1, 2]")) == {}
    assert hf_config.read(folder(tmp_path, config_json="not json")) == {}
    resnet = types.SimpleNamespace(depth=50)  # no mlp or ln_eps: nothing a config could contradict
    assert hf_config.mismatches({"hidden_act": "relu", "layer_norm_eps": 1e-12}, resnet) == []
    assert hf_config.mismatches({"hidden_act": "some_new_act"}, VIT) == []  # unknown: not guessed
