"""The fast linear-evaluation path equals the step over the whole model."""
import pytest
import torch

from fpipe import freeze, tree
from fpipe.models import model as model_lib
from fpipe.train import frozen_trunk as ft_lib
from fpipe.train import step as step_lib
from test_fold import _model


class _SGD:
    def init(self, params):
        return {}

    def update(self, grads, state, params, lr):
        return tree.map_leaves(lambda p, g: p - lr * g, params, grads), state


@pytest.mark.parametrize("compile", [False, True])
def test_frozen_trunk_step_equals_whole_step(compile):
    heads = dict(res4=model_lib.head_config("res4", "eval_mlp", pool=[2, 2]),
                 fc=model_lib.head_config("flatten", "linear"))
    model, params, state = _model(18, heads)
    trainable, frozen = freeze.partition(params, ["trunk"])
    eval_norms = freeze.eval_norms(state, frozen)
    gen = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=gen), "label": torch.randint(0, 5, (8,), generator=gen)}
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": {}}
    lr = torch.tensor(0.1)
    ref_ts, ref_m = step_lib.make_step(model, _SGD(), eval_norms=eval_norms)(ts, batch, lr)

    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, compile=compile)
    step = ft_lib.on_features(step_lib.make_step(ft.model, _SGD(), eval_norms=eval_norms), ft.features)
    new_ts, m = step(ts, batch, lr)
    for k in ("loss", "res4/loss", "fc/loss"):
        torch.testing.assert_close(m[k], ref_m[k], rtol=1e-4, atol=1e-5)
    for n, v in tree.flatten(new_ts["trainable"]).items():
        torch.testing.assert_close(v, tree.flatten(ref_ts["trainable"])[n], rtol=1e-4, atol=1e-5)
    for n, v in tree.flatten(new_ts["model_state"]).items():  # the heads' BN trains; trunk state unchanged
        torch.testing.assert_close(v, tree.flatten(ref_ts["model_state"])[n], rtol=1e-4, atol=1e-5)
    assert new_ts["frozen"] is frozen


def test_frozen_trunk_refuses_a_training_trunk():
    model, params, state = _model(18)
    trainable, frozen = freeze.partition(params, [r"trunk\.conv1\..*"])
    with pytest.raises(ValueError, match="whole trunk frozen"):
        ft_lib.frozen_trunk(model, trainable, frozen, state, freeze.eval_norms(state, frozen), compile=False)
