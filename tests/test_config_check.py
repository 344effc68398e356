"""fpipe.train.config_check: bad values are refused before anything runs, naming the key and what is wanted."""
import re

import pytest

from configs import knn
from fpipe.train import config_check


def test_every_protocol_value_is_checked_before_the_run_naming_its_key():
    """A bad number used to fail after the extraction (exit 1, workdir claimed) or give a table of 0%."""
    config_check.check(knn.get_config())
    for key, value, wanted in [("linear.lrs", (-0.1,), "learning rates > 0"), ("knn.temperature", -1.0, "> 0"),
                               ("knn.ks", (0,), "whole numbers >= 1"), ("low_shot.shots", (0,), "samples per class"),
                               ("low_shot.classifier", "svm", r"one of \('logreg', 'knn'\)"),
                               ("normalize", "l3", "one of"), ("val_fraction", 1.0, r"in \(0, 1\)"),
                               ("logreg.Cs", (), "at least one")]:
        config = knn.get_config()
        section, _, name = key.rpartition(".")
        (config.eval[section] if section else config.eval)[name] = value
        with pytest.raises(config_check.ConfigError, match=rf"eval\.{re.escape(key)}=.*: want .*{wanted}"):
            config_check.check(config)


def test_weights_path_may_be_a_model_folder_but_not_any_folder(tmp_path):
    """A Hugging Face model folder (its model.safetensors, pytorch_model.bin or shard index) is a
    weights path; a folder of something else is refused, saying what a model folder holds."""
    from configs import linear_eval
    config = linear_eval.get_config()
    config.model.weights.path = str(tmp_path)
    with pytest.raises(config_check.ConfigError, match="is a directory: give the weights file .or a Hugging Face "
                                                       "model folder, holding model.safetensors or pytorch_model.bin"):
        config_check.check(config)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    config_check.check(config)  # the folder's own errors come when it is read


def test_a_model_folders_config_json_must_agree_with_the_trunk(tmp_path):
    """GELU or QuickGELU, eps 1e-12 or 1e-6: the same tensors, other features. A Hugging Face
    folder's config.json says which the weights were trained with; a trunk that computes otherwise
    is refused before any work, naming the settings to use."""
    from configs import linear_eval
    config = linear_eval.get_config("vit_s16")
    (tmp_path / "model.safetensors").write_bytes(b"")
    config.model.weights.path = str(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_config": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}, '
                                          '"text_config": {"hidden_act": "gelu"}}')
    with pytest.raises(config_check.ConfigError, match=r"its config.json says the trunk computes mlp='quick_gelu', "
                                                       r"ln_eps=1e-05; the model has mlp='gelu', ln_eps=1e-06\. Set "
                                                       r"--config.model.trunk.mlp=quick_gelu "
                                                       r"--config.model.trunk.ln_eps=1e-05"):
        config_check.check(config)
    config.model.trunk.mlp, config.model.trunk.ln_eps = "quick_gelu", 1e-5
    config_check.check(config)
    (tmp_path / "config.json").write_text("[not a model config")  # unreadable: nothing to check
    config_check.check(config)


def test_an_open_clip_folder_says_quick_gelu_in_its_own_config(tmp_path):
    from configs import linear_eval
    config = linear_eval.get_config("vit_s16")
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 512, "quick_gelu": true}}')
    config.model.weights.path = str(tmp_path)
    with pytest.raises(config_check.ConfigError, match=r"mlp='quick_gelu'.*Set --config.model.trunk.mlp=quick_gelu"):
        config_check.check(config)
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 512}}')  # GELU, as the trunk
    config_check.check(config)


def test_layer_decay_is_checked_against_the_trunk_before_the_run():
    """optim.layer_decay numbers ViT, Swin and ConvNeXt layers: a ResNet's config is refused before
    anything is written."""
    from configs import finetune
    config = finetune.get_config()
    config.optim.layer_decay = 0.65
    with pytest.raises(config_check.ConfigError,
                       match="optim.layer_decay numbers the layers of ViT, Swin and ConvNeXt"):
        config_check.check(config)
    config.model.trunk.name, config.model.trunk.depth = "beit_base_patch16_224", 2
    config.model.heads.fc.feature = "lastPOOL"
    config_check.check(config)
    config.optim.layer_decay = 0.0
    with pytest.raises(config_check.ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        config_check.check(config)


@pytest.mark.parametrize("accum, views, message", [
    (0, (), "accum_steps=0: a whole number >= 1"),
    (3, (), "accum_steps=3 must divide data.batch_size=64"),
    (2, ((2, "random_resized_crop|normalize"),), "with data.views .multi-crop. is not supported")])
def test_gradient_accumulation_settings_are_checked(accum, views, message):
    from configs import supervised
    config = supervised.get_config()
    config.accum_steps, config.data.views = accum, views
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.check(config)
    config.accum_steps, config.data.views = 4, ()
    config_check.check(config)
