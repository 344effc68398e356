"""Helpers for the trunk-family tests: reference weights into a trunk's trees, a tolerance check."""
import torch

from fpipe import tree


def reference_trunk(reference, module, name, **options):
    """``(trunk, params, state, state_dict)``: preset ``name`` of ``module`` holding the seeded
    weights the reference outputs were computed with (rows the trunk lacks stay in state_dict)."""
    trunk = module.build(**{**module.PRESETS[name], **options})
    sd = reference.seeded_state_dict(reference.load_manifest(name), 0)
    p0, s0 = trunk.init(0)
    params = tree.unflatten({n: sd[n] for n in tree.flatten(p0)})
    state = tree.unflatten({n: sd[n] for n in tree.flatten(s0)})
    return trunk, params, state, sd


def reference_outputs(reference, file_name):
    return torch.load(reference.OUTPUTS / f"{file_name}.pt", weights_only=True)


def assert_close_to_largest(actual, expected, what, rtol=1e-4):
    """Within ``rtol`` of the expected tensor's largest magnitude (the fixtures' agreement)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= rtol * expected.abs().max().item(), (what, err)
