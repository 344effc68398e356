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


def load_target(trunk) -> tuple:
    """``(params, state, target)``: ``trunk.init(0)`` and the loader's flat view of it (``trunk.<name>``)."""
    params, state = trunk.init(0)
    return params, state, {f"trunk.{n}": t for n, t in {**tree.flatten(params), **tree.flatten(state)}.items()}


def loaded_trees(loaded: dict, params, state) -> tuple:
    """``(params, state)`` trees holding ``load_into``'s values for the trunk."""
    pick = lambda like: tree.unflatten({n: loaded[f"trunk.{n}"] for n in tree.flatten(like)})  # noqa: E731
    return pick(params), pick(state)
