"""fpipe.data.rand_augment against timm's RandAugment (tests/fixtures/rand_augment): the same
pixels from the same draws, every op family met; and its place in a pipeline."""
import pathlib
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fpipe.data import pipeline
from fpipe.data import rand_augment as RA

FACTS = torch.load(pathlib.Path(__file__).parent / "fixtures" / "rand_augment" / "outputs.pt", weights_only=True)


class TimmDraws:
    """timm's draws: the ops by numpy's legacy global generator, the rest by python's random."""

    def __init__(self, seed):
        self.numpy, self.python = np.random.RandomState(seed), random.Random(seed)

    def choice(self, n, k):
        return list(self.numpy.choice(n, k))

    def random(self):
        return self.python.random()

    def gauss(self, mu, sigma):
        return self.python.gauss(mu, sigma)


def options(config: str) -> dict:
    """timm's config string as rand_augment's arguments."""
    parts = dict(re.match(r"([a-z]+)([\d.]+)", p).groups() for p in config.split("-")[1:])
    return dict(magnitude=float(parts["m"]), num_layers=int(parts.get("n", 2)),
                magnitude_std=float(parts.get("mstd", 0)), increasing=parts.get("inc") == "1",
                prob=float(parts.get("p", 0.5)), fill=tuple(FACTS["fill"]))


@pytest.mark.parametrize("case", sorted(FACTS["cases"]))
def test_rand_augment_makes_timms_pixels_from_timms_draws(case):
    config, seed = case.rsplit("/", 1)
    want = FACTS["cases"][case]
    got = RA.from_pil(RA.augment(RA.to_pil(FACTS["image"]), TimmDraws(int(seed)), **options(config)))
    if isinstance(want, str):  # timm asked Pillow >= 12 for posterize(bits=0); ours answers black
        assert "bits" in want
        return
    assert torch.equal(got, want), case


def test_the_fixture_changes_most_images_and_every_op_family_is_drawn():
    changed = [not torch.equal(v, FACTS["image"]) for v in FACTS["cases"].values() if not isinstance(v, str)]
    assert sum(changed) > 0.6 * len(changed)
    drawn = set()
    for case in FACTS["cases"]:
        config, seed = case.rsplit("/", 1)
        names = RA.op_names(options(config)["increasing"])
        drawn |= {names[i] for i in TimmDraws(int(seed)).choice(len(names), options(config)["num_layers"])}
    assert {n.replace("Increasing", "") for n in drawn} == set(RA.OPS)


def test_posterize_at_magnitude_10_gives_black_where_pillow_12_refuses():
    image = RA.to_pil(FACTS["image"])

    class Always:
        def choice(self, n, k):
            return [RA.op_names(True).index("PosterizeIncreasing")] * k

        def random(self):
            return 0.0

        def gauss(self, mu, sigma):
            return 10.0

    assert not np.asarray(RA.augment(image, Always(), num_layers=1)).any()


def test_in_a_pipeline_it_runs_per_sample_on_uint8_and_refuses_normalised_input():
    p = pipeline.parse("random_resized_crop(16)|flip|rand_augment|normalize")
    assert len(p.per_sample) == 1
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    a = p(image, torch.Generator().manual_seed(3))
    assert torch.equal(a, p(image, torch.Generator().manual_seed(3))) and a.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="place it before normalize"):
        pipeline.parse("normalize|rand_augment")
    with pytest.raises(ValueError, match="rand_augment works on RGB images"):
        pipeline.parse("rand_augment")(image[:1], torch.Generator())  # one channel
    as_float = pipeline.parse("rand_augment")(image.float() / 255, torch.Generator().manual_seed(3))
    assert torch.equal(as_float, pipeline.parse("rand_augment")(image, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="interpolation='nearest'"):
        pipeline.parse("rand_augment(interpolation='nearest')")
    assert isinstance(RA.to_pil(image), Image.Image)


def test_rand_augment_in_the_evaluation_transforms_is_refused():
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import supervised
    from fpipe.train import config_check
    c = supervised.get_config()
    c.data.eval_transforms = "resize|center_crop|rand_augment|normalize"
    with pytest.raises(config_check.ConfigError, match="rand_augment, a training augmentation"):
        config_check.check(c)
