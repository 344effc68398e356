"""Small replicas of the checkpoint layouts in shared/FORMATS.md, built from seeded ResNet-18s.

Imported by the other test_weights_* files; the tests here check the fixtures themselves.
"""
import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(os.environ.get("FPIPE_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
_spec = importlib.util.spec_from_file_location("fpipe_reference_seeded", REFERENCE / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)

MANIFEST = seeded.load_manifest("resnet18")
_CACHE = {}


def state_dict(seed: int = 0) -> dict:
    """torchvision's resnet18 state_dict (with fc.*), seeded; a fresh dict of shared tensors."""
    if seed not in _CACHE:
        _CACHE[seed] = seeded.seeded_state_dict(MANIFEST, seed)
    return dict(_CACHE[seed])


def trunk(seed: int = 0) -> dict:
    return {n: t for n, t in state_dict(seed).items() if not n.startswith("fc.")}


def target(*, heads: bool = False, manifest=MANIFEST) -> dict:
    """The loader's view of an fpipe resnet18: zeros named ``trunk.*`` (and ``heads.fc.*``).

    The tensors are shared between calls (load_into never writes into its target); the dict is new.
    """
    key = ("target", heads, id(manifest))
    if key not in _CACHE:
        _CACHE[key] = _zeros(heads, manifest)
    return dict(_CACHE[key])


def _zeros(heads, manifest) -> dict:
    out = {}
    for name, shape, dtype in manifest:
        group = "heads" if name.startswith("fc.") else "trunk"
        if group == "trunk" or heads:
            out[f"{group}.{name}"] = torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[1]))
    return out


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + n: t for n, t in sd.items()}


def assert_trunk_is(loaded: dict, sd: dict) -> None:
    """Every trunk weight in ``loaded`` equals ``sd``'s, exactly (counters aside)."""
    names = [n for n in loaded if n.startswith("trunk.") and not n.endswith("num_batches_tracked")]
    assert names
    for n in names:
        assert torch.equal(loaded[n], sd[n[len("trunk."):]]), n


def mlp(prefix: str, dims, seed: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a, generator=g)
        out[f"{prefix}{2 * i}.bias"] = torch.randn(b, generator=g)
    return out


def layouts() -> dict:
    """``{name: (file contents, seed of the copy that should load)}``; 0 is the evaluated copy."""
    a, b = state_dict(0), state_dict(1)
    ta, tb = trunk(0), trunk(1)
    no_counters = {n: t for n, t in a.items() if not n.endswith("num_batches_tracked")}
    namespace = argparse.Namespace(arch="resnet18", lr=0.3)
    lr = np.float64(0.03)
    return {
        "torchvision": (a, 0),
        "torchvision_pre_0_4_1": (no_counters, 0),
        "timm_training": ({"epoch": 9, "arch": "resnet18", "state_dict": b, "state_dict_ema": a,
                           "args": namespace}, 0),
        "moco_v2": ({"epoch": 200, "arch": "resnet18", "state_dict": {
            **prefixed("module.encoder_q.", ta), **mlp("module.encoder_q.fc.", [512, 512, 128]),
            **prefixed("module.encoder_k.", tb), **mlp("module.encoder_k.fc.", [512, 512, 128]),
            "module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}, 0),
        "moco_v3": ({"epoch": 100, "state_dict": {
            **prefixed("module.base_encoder.", ta), **mlp("module.base_encoder.fc.", [512, 256, 64]),
            **prefixed("module.momentum_encoder.", tb), **mlp("module.predictor.", [64, 256, 64])},
            "scaler": {"scale": 1024.0, "growth_factor": 2.0}}, 0),
        "dino": ({"teacher": {**prefixed("module.backbone.", ta),
                              "module.head.last_layer.weight_g": torch.ones(512, 1),
                              "module.head.last_layer.weight_v": torch.randn(512, 256)},
                  "student": {**prefixed("module.backbone.", tb),
                              "module.head.last_layer.weight_g": torch.ones(512, 1)},
                  "optimizer": {"param_groups": [{"lr": lr, "weight_decay": np.float64(0.04)}]},
                  "epoch": 100, "args": namespace, "dino_loss": {"center": torch.zeros(1, 512)}}, 0),
        "swav_training": ({"epoch": 800, "state_dict": {
            **prefixed("module.", ta), **mlp("module.projection_head.", [512, 256, 128]),
            "module.prototypes.weight": torch.randn(300, 128)},
            "optimizer": {"param_groups": [{"lr": lr}]}}, 0),
        "swav_released": ({**prefixed("module.", ta), **mlp("module.projection_head.", [512, 128])}, 0),
        "barlow_released": (ta, 0),
        "barlow_training": ({"epoch": 1000, "model": {
            **prefixed("module.backbone.", ta), **mlp("module.projector.", [512, 1024, 1024]),
            "module.bn.running_mean": torch.zeros(1024), "module.bn.running_var": torch.ones(1024)},
            "optimizer": {"state": {}}}, 0),
        "simsiam": ({"epoch": 100, "arch": "resnet18", "state_dict": {
            **prefixed("module.encoder.", ta), **mlp("module.encoder.fc.", [512, 512, 512]),
            **mlp("module.predictor.", [512, 128, 512])}}, 0),
        "vissl_pretraining": ({"type": "checkpoint", "phase_idx": 3, "classy_state_dict": {
            "base_model": {"model": {"trunk": prefixed("_feature_blocks.", ta),
                                     "heads": mlp("0.clf.", [512, 128])}},
            "loss": {"queue": torch.randn(128, 64), "moco_encoder": prefixed("trunk._feature_blocks.", tb)}}}, 0),
        "vissl_linear_eval": ({"classy_state_dict": {"base_model": {"model": {
            "trunk": prefixed("base_model._feature_blocks.", ta),
            "heads": {f"{i}.clf.clf.0.weight": torch.randn(10, 64) for i in range(7)}}}}}, 0),
        # Prefixes that appear nowhere in fpipe's code.
        "byol_lucidrains": ({**prefixed("learner.online_encoder.net.", a),
                             **prefixed("learner.target_encoder.net.", b),
                             **mlp("learner.online_predictor.net.", [256, 4096, 256])}, 0),
        "backbone_prefix": (prefixed("backbone.", ta), 0),
        "model_prefix": ({"state": prefixed("model.", a)}, 0),
        "sequential_encoder": (prefixed("encoder_q.0.", ta), 0),
        "never_seen": ({"ckpt": {"weights": {"zz_net.trunk_v7.": None, **prefixed("zz_net.trunk_v7.", ta)}}}, 0),
    }


def test_target_has_the_manifest_names():
    t = target(heads=True)
    assert [n.split(".", 1)[1] for n in t] == [row[0] for row in MANIFEST]
    assert t["trunk.bn1.num_batches_tracked"].dtype == torch.int64


def test_layout_copies_differ():
    a, b = trunk(0), trunk(1)
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"])
