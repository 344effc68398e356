"""Heads against torch.nn equivalents built from the same weights (VISSL's MLP / eval_mlp layout)."""
import torch

from fpipe.models import heads


def test_mlp_matches_torch_sequential_and_names_follow_vissl():
    gen = torch.Generator().manual_seed(0)
    params, state = heads.init(gen, "mlp", (16,), (32, 8), use_bn=True, use_relu=True)
    assert sorted(params["clf"]) == ["0", "1", "3"]  # Linear, BN, (ReLU), Linear
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 8))
    ref.load_state_dict({f"{k}.{n}": v for k, d in {**params["clf"]}.items() for n, v in d.items()}
                        | {f"1.{n}": v for n, v in state["clf"]["1"].items()})
    x = torch.randn(5, 16)
    y, new_state = heads.apply("mlp", params, state, x, train=True, dims=(32, 8), use_bn=True, use_relu=True)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(new_state["clf"]["1"]["running_mean"], ref[1].running_mean)


def test_eval_mlp_is_channel_bn_flatten_linear():
    gen = torch.Generator().manual_seed(0)
    params, state = heads.init(gen, "eval_mlp", (4, 2, 2), (3,))
    x = torch.randn(6, 4, 2, 2)
    bn = torch.nn.BatchNorm2d(4)
    lin = torch.nn.Linear(16, 3)
    lin.load_state_dict(params["clf"]["clf"]["0"])
    y, new_state = heads.apply("eval_mlp", params, state, x, train=True, dims=(3,))
    torch.testing.assert_close(y, lin(bn(x).flatten(1)))
    torch.testing.assert_close(new_state["channel_bn"]["running_var"], bn.running_var)
    y_eval, s_eval = heads.apply("eval_mlp", params, state, x, train=True, dims=(3,), eval_norms={"channel_bn"})
    bn.eval()
    bn.running_mean.zero_(), bn.running_var.fill_(1)
    torch.testing.assert_close(y_eval, lin(bn(x).flatten(1)))
    assert s_eval["channel_bn"] is state["channel_bn"]


def test_linear_has_torchvision_fc_names():
    params, state = heads.init(torch.Generator().manual_seed(0), "linear", (512,), (10,))
    assert {k: tuple(v.shape) for k, v in params.items()} == {"weight": (10, 512), "bias": (10,)}
    assert state == {}


def test_mae_probe_head_is_batchnorm1d_without_affine_then_linear():
    """MAE's main_linprobe.py: BatchNorm1d(affine=False, eps=1e-6) before the linear head."""
    gen = torch.Generator().manual_seed(0)
    opts = dict(bn_affine=False, bn_eps=1e-6, init_std=0.01)
    params, state = heads.init(gen, "eval_mlp", (16,), (5,), **opts)
    assert "channel_bn" not in params and set(state["channel_bn"]) == {"running_mean", "running_var",
                                                                       "num_batches_tracked"}
    ref = torch.nn.Sequential(torch.nn.BatchNorm1d(16, affine=False, eps=1e-6), torch.nn.Linear(16, 5))
    ref[1].load_state_dict(params["clf"]["clf"]["0"])
    x = torch.randn(8, 16) * 1e-3  # eps matters at this scale: 1e-5 would be off by half
    y, new_state = heads.apply("eval_mlp", params, state, x, train=True, dims=(5,), **opts)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(new_state["channel_bn"]["running_var"], ref[0].running_var)
    ref.eval()
    y, _ = heads.apply("eval_mlp", params, new_state, x, train=False, dims=(5,), **opts)
    torch.testing.assert_close(y, ref(x))


def test_mlp_batchnorm_without_affine_holds_no_params():
    params, state = heads.init(torch.Generator().manual_seed(0), "mlp", (16,), (8, 4), use_bn=True,
                               bn_affine=False)
    assert sorted(params["clf"]) == ["0", "2"] and sorted(state["clf"]) == ["1"]
    y, _ = heads.apply("mlp", params, state, torch.randn(3, 16), train=True, dims=(8, 4), use_bn=True,
                       bn_affine=False)
    assert y.shape == (3, 4)
