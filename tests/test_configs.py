"""Every shipped config builds, and every one of its keys can be set from the command line."""
import pathlib
import subprocess
import sys

import pytest
from ml_collections import config_dict

from fpipe.models import model as models

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
CONFIGS += ["linear_eval:vissl_imagenet", "linear_eval:multi_crop",
            "linear_eval:multi_input", "supervised:multi_task", "detection:coco_torchvision",
            "finetune:mae_vit_b", "finetune:convnextv2_base"]  # documented variants (get_config's argument)
FLAG_TYPES = (bool, int, float, str, tuple)  # what config_flags can parse from a command line


def load(name):
    sys.path.insert(0, str(ROOT))
    name, _, arg = name.partition(":")
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    return module.get_config(arg or None)


def leaves(cfg, prefix=""):
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, config_dict.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", cfg._fields[key], value


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_is_overridable_from_the_command_line(name):
    bad = []
    for key, field, value in leaves(load(name)):
        if isinstance(field, config_dict.FieldReference):  # a typed placeholder
            continue
        if value is None or not isinstance(value, FLAG_TYPES):
            bad.append(f"{key}={value!r} ({type(value).__name__})")
    assert not bad, "use a tuple or ml_collections placeholder(type) for: " + "; ".join(bad)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_model(name):
    cfg = load(name)
    if "detection" in cfg.model:  # configs/detection.py: Faster/Mask/Keypoint R-CNN
        from fpipe.detection import model as det_model
        for mask, keypoints in ((False, False), (True, True)):
            cfg.model.detection.mask_head.enabled, cfg.model.detection.keypoint_head.enabled = mask, keypoints
            params, _ = det_model.build(cfg.model.detection, 4).init(0)
            assert ("mask_predictor" in params["roi_heads"]) == mask
        return
    model = models.build(cfg.model, num_classes=10, image_size=cfg.data.image_size)
    assert model.heads or "eval" in cfg  # evaluation runs (configs/knn.py & co.) train no heads
    if name == "linear_eval:vissl_imagenet":  # VISSL's feature sizes per evaluated layer
        dims = {h.name: h for h in model.heads}
        params, _ = model.init(0)
        sizes = {n: params["heads"][n]["clf"]["clf"]["0"]["weight"].shape[1] for n in dims}
        assert sizes == dict(conv1=9216, res2=9216, res3=8192, res4=9216, res5=8192, res5avg=2048)


def test_overrides_of_tuples_and_placeholders_parse(tmp_path):
    """The flag parser itself: a placeholder, a tuple of rules, a head's pooling grid."""
    script = ("from absl import app, flags\nfrom ml_collections import config_flags\n"
              "config_flags.DEFINE_config_file('config', lock_config=True)\n"
              "def main(_):\n  c = flags.FLAGS.config\n"
              "  print(c.total_steps, c.optim.lr_mults, c.model.heads.res4.pool, c.schedule.milestones_epochs)\n"
              "app.run(main)\n")
    out = subprocess.run([sys.executable, "-c", script, "--config=configs/linear_eval.py",
                          "--config.total_steps=7", "--config.optim.lr_mults=((r'heads\\..*', 10.0),)",
                          "--config.model.heads.res4.pool=(1, 1)", "--config.schedule.milestones_epochs=(8, 16)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "7 (('heads\\\\..*', 10.0),) (1, 1) (8, 16)"


def test_loading_every_config_imports_no_torch():
    """Config files build from fpipe.defaults only: loading one (a sweep tool, --config_only) is cheap."""
    variants = [*CONFIGS, "linear_eval:vit_s16", "linear_eval:dinov2_imagenet", "linear_eval:beit_imagenet",
                "linear_eval:mae_imagenet", "linear_eval:dino_imagenet"]
    script = ("import sys\nsys.path.insert(0, '.')\n"
              f"for name in {variants!r}:\n"
              "    name, _, arg = name.partition(':')\n"
              "    __import__(f'configs.{name}', fromlist=['get_config']).get_config(arg or None)\n"
              "heavy = sorted(m for m in ('torch', 'numpy', 'sklearn') if m in sys.modules)\n"
              "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", [n for n in CONFIGS if ":" not in n])
def test_an_unknown_variant_is_refused_naming_the_config(name):
    """``--config=configs/knn.py:resnet50`` must not run knn's defaults in a workdir named after resnet50."""
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    with pytest.raises(ValueError, match=rf"{name}.*'no_such_variant'"):
        module.get_config("no_such_variant")


@pytest.mark.parametrize("name", ["supervised", "detection", "knn"])
def test_a_training_run_on_cuda_sets_cudnn_benchmark_from_its_config_and_a_cpu_run_leaves_it(name, monkeypatch):
    import torch
    from fpipe.train import distributed, loop

    class Dist:  # what distributed.init gives a process, without a process group
        device = torch.device("cuda", 0)

        def shutdown(self):
            pass

    monkeypatch.setattr(distributed, "init", lambda **kwargs: Dist())
    seen = lambda config: loop.in_processes(lambda *args: torch.backends.cudnn.benchmark, config, "unused")
    before = torch.backends.cudnn.benchmark
    try:
        config = load(name)
        assert config.cudnn_benchmark is True  # the shipped default: steps of fixed shapes
        torch.backends.cudnn.benchmark = False
        assert seen(config) is True
        config.cudnn_benchmark = False
        torch.backends.cudnn.benchmark = True
        assert seen(config) is False
        Dist.device = torch.device("cpu")
        config.cudnn_benchmark = True
        torch.backends.cudnn.benchmark = False
        assert seen(config) is False
    finally:
        torch.backends.cudnn.benchmark = before
