"""fpipe.data.mix against timm's Mixup and RandomErasing (tests/fixtures/mix) and torch's label
smoothing, and its place in the run: soft targets train, evaluation stays on the labels."""
import json
import pathlib

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpipe import defaults
from fpipe.data import mix
from fpipe.models import losses

FACTS = torch.load(pathlib.Path(__file__).parent / "fixtures" / "mix" / "outputs.pt", weights_only=True)


class LegacyNumpy:
    """numpy's legacy global generator (what timm draws from) behind the Generator methods mix uses."""

    def __init__(self, seed):
        self.state = np.random.RandomState(seed)

    def random(self):
        return self.state.rand()

    def beta(self, a, b):
        return self.state.beta(a, b)

    def integers(self, low, high):
        return self.state.randint(low, high)


def config(**args):
    c = defaults.mix()
    c.update(args)
    return c


@pytest.mark.parametrize("case", sorted(FACTS["cases"]))
def test_mixup_and_cutmix_make_what_timm_makes_from_the_same_draws(case):
    fact = FACTS["cases"][case]
    seed = int(case.split("/")[1])
    cfg = config(**fact["args"])
    images, labels = FACTS["images"], FACTS["labels"]
    lam, box = mix.draw(cfg, LegacyNumpy(seed), tuple(images.shape[-2:]))
    got, targets = mix.apply(images, labels, FACTS["classes"], lam, box, cfg.label_smoothing)
    torch.testing.assert_close(got, fact["images"], rtol=0, atol=1e-6)
    torch.testing.assert_close(targets, fact["targets"], rtol=0, atol=1e-6)
    assert torch.equal(images, FACTS["images"])  # the loader's batch is not written into


def test_the_fixture_covers_mixup_cutmix_and_unmixed_batches():
    kinds = set()
    for case, fact in FACTS["cases"].items():
        seed = int(case.split("/")[1])
        lam, box = mix.draw(config(**fact["args"]), LegacyNumpy(seed), (10, 13))
        kinds.add("none" if lam == 1.0 else "mixup" if box is None else "cutmix")
    assert kinds == {"none", "mixup", "cutmix"}


def test_label_smoothing_learns_what_torchs_label_smoothing_learns():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    soft = mix.smooth_one_hot(labels, 5, 0.1)
    torch.testing.assert_close(losses.loss("cross_entropy", logits, soft),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert losses.train_metric("cross_entropy", logits, soft)[1] == losses.train_metric("cross_entropy", logits,
                                                                                        labels)[1]


def test_draws_depend_on_the_seed_and_step_only():
    cfg = config(mixup_alpha=0.8, cutmix_alpha=1.0)
    draws = [mix.draw(cfg, mix.generator(0, step), (32, 32)) for step in range(50)]
    assert draws == [mix.draw(cfg, mix.generator(0, step), (32, 32)) for step in range(50)]
    assert draws != [mix.draw(cfg, mix.generator(1, step), (32, 32)) for step in range(50)]
    assert 10 < sum(box is not None for _, box in draws) < 40  # switch_prob 0.5
    assert all(box is None and lam == 1.0 for lam, box in
               (mix.draw(config(mixup_alpha=0.8, prob=0.0), mix.generator(0, s), (8, 8)) for s in range(10)))


def test_a_run_with_mixup_trains_on_soft_targets_and_evaluates_on_labels(tmp_path):
    from test_main import main
    main(tmp_path / "mix", "--config.total_steps=4", "--config.mix.mixup_alpha=0.8", "--config.mix.cutmix_alpha=1.0",
         "--config.mix.label_smoothing=0.1", "--config.mix.random_erasing=0.25", config="configs/supervised.py")
    results = json.loads((tmp_path / "mix" / "results.json").read_text())
    assert 0 <= results["heads"]["fc"]["top1"] <= 100
    main(tmp_path / "plain", "--config.total_steps=4", config="configs/supervised.py")
    loss = lambda run: [json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(l)]
    assert loss("mix") != loss("plain")


def test_mixing_heads_of_other_targets_or_multi_crop_is_refused():
    from fpipe.train import config_check
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import linear_eval, supervised
    c = supervised.get_config("multi_task")
    c.mix.mixup_alpha = 0.8
    with pytest.raises(config_check.ConfigError, match=r"mix .*learn another target or loss"):
        config_check.check(c)
    c = linear_eval.get_config("multi_crop")
    c.mix.cutmix_alpha = 1.0
    with pytest.raises(config_check.ConfigError, match="multi-crop"):
        config_check.check(c)
    c = supervised.get_config()
    c.mix.prob = 1.5
    with pytest.raises(config_check.ConfigError, match=r"mix.prob=1.5"):
        config_check.check(c)
    assert isinstance(c.mix, ml_collections.ConfigDict)
    from configs import knn
    assert "mix" not in knn.get_config() and "eval_classes" not in knn.get_config()  # no heads to mix or score


class PythonRandom:
    """python's random module (what timm's RandomErasing draws from) behind the methods mix uses."""

    def __init__(self, seed):
        self.state = __import__("random").Random(seed)

    def random(self):
        return self.state.random()

    def uniform(self, a, b):
        return self.state.uniform(a, b)

    def integers(self, low, high):  # numpy's exclusive high; python's randint is inclusive
        return self.state.randint(low, high - 1)


@pytest.mark.parametrize("seed", sorted(FACTS["erasing"]))
def test_random_erasing_erases_what_timm_erases_from_the_same_draws(seed):
    torch.manual_seed(seed)  # timm's noise comes from torch's global generator
    rng = PythonRandom(seed)  # one generator for the whole batch, in turn, as timm's global one
    got = mix.random_erase(FACTS["images"], 0.5, [rng] * len(FACTS["images"]))
    torch.testing.assert_close(got, FACTS["erasing"][seed], rtol=0, atol=0)


def test_the_erasing_fixture_erases_some_images_and_keeps_others():
    changed = [(FACTS["erasing"][s] != FACTS["images"]).flatten(1).any(1) for s in FACTS["erasing"]]
    assert torch.stack(changed).any() and not torch.stack(changed).all()


def test_maes_finetuning_recipe_runs_end_to_end_on_a_small_vit(tmp_path):
    """configs/finetune.py:mae_vit_b as it is (fc_norm pooling, drop path, layer decay, AdamW,
    warmup from 0, Mixup/CutMix/smoothing/erasing), on the digits with a ViT shrunk to 2 blocks."""
    from test_main import main
    small = ["--config.data.name=digits", "--config.data.num_workers=0", "--config.model.trunk.depth=2",
             "--config.model.trunk.hidden_dim=48", "--config.model.trunk.heads=3", "--config.model.trunk.mlp_dim=96",
             "--config.model.trunk.patch_size=4", "--config.model.trunk.image_size=16", "--config.total_steps=4",
             "--config.schedule.warmup_epochs=0.05"]
    main(tmp_path, *small, config="configs/finetune.py:mae_vit_b")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["heads"]) == {"head"}
    log = (tmp_path / "log").read_text()
    assert "layer_decay" in log or "layer decay" in log


def test_erasing_draws_by_sample_so_a_split_batch_erases_alike():
    """Two processes each holding half of a global batch erase what one process erases."""
    cfg = config(random_erasing=0.6)
    images, labels = torch.randn(8, 3, 12, 12), torch.arange(8) % 3
    index = torch.tensor([5, 17, 3, 9, 11, 0, 2, 40])
    whole = mix.training_batch({"image": images, "label": labels, "index": index}, cfg, 3, seed=0, step=7)
    halves = [mix.training_batch({"image": images[s], "label": labels[s], "index": index[s]}, cfg, 3, seed=0, step=7)
              for s in (slice(0, 4), slice(4, 8))]
    assert torch.equal(whole["image"], torch.cat([h["image"] for h in halves]))
    assert not torch.equal(whole["image"], images)
