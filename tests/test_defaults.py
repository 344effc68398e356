"""fpipe/defaults.py holds every section's defaults; the modules that use them agree with it."""
import pytest

from fpipe import data, defaults, optim, schedules, weights
from fpipe.evaluate import config as eval_config
from fpipe.models import model
from fpipe.train import precision


def test_trunk_option_table_equals_the_families_options():
    """The torch-free table of trunk options cannot drift from what the families take."""
    assert defaults.TRUNK_OPTION_TYPES == model.trunk_option_types()


@pytest.mark.parametrize("owner,section", [(data, defaults.data), (optim, defaults.optim),
                                           (schedules, defaults.schedule), (precision, defaults.precision),
                                           (weights, defaults.weights), (eval_config, defaults.evaluation)])
def test_each_owner_reads_its_defaults_from_one_place(owner, section):
    assert owner.default_config().to_dict() == section().to_dict()


def test_weights_options_resolve_to_the_defaults():
    opts = weights.config.resolve(None)
    assert {k: getattr(opts, k) for k in defaults.weights()} == defaults.weights().to_dict()
    assert weights.config.resolve({"path": "x.pt"}).path == "x.pt"


def test_a_trunk_config_refuses_an_unknown_option_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown trunk option\(s\) \['depht'\]; valid: \['bottleneck"):
        defaults.trunk("resnet18", depht=18)
