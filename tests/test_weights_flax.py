"""JAX/Flax ``.npz`` ViTs (google-research/vision_transformer, big_vision) load by ``format: auto``.

tests/fixtures/flax holds the archives' names and shapes, as timm's own ``.npz`` loader reads
them, and timm's features after that loader read them with seeded values (made by
``make_flax_fixtures.py`` in a separate venv). Here the same archives are rebuilt with numpy,
loaded into fpipe's ViT and run: fpipe must compute what timm computes.
"""
import json
import pathlib
import zipfile

import numpy as np
import pytest
import torch

from _trunks import assert_close_to_largest, load_target, loaded_trees
from fpipe.models import model as model_lib
from fpipe.weights import WeightsError, flax_layout, io, load_into

FLAX = pathlib.Path(__file__).parent / "fixtures" / "flax"
MANIFESTS = json.loads((FLAX / "manifests.json").read_text())
OUTPUTS = torch.load(FLAX / "outputs.pt", weights_only=True)
# big_vision's model pools the patch tokens (no class token; its positions have no class row)
OPTIONS = {"vision_transformer": {}, "big_vision_scan": {"class_token": False, "pos_embed_class": False}}


def archive(reference, name, tmp_path) -> pathlib.Path:
    path = tmp_path / f"{name}.npz"
    weights = reference.seeded_state_dict(MANIFESTS[name]["state_dict"], 0)
    np.savez(path, **{n: t.numpy() for n, t in weights.items()})
    return path


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_npz_vit_computes_what_timm_computes_after_its_npz_loader(reference, tmp_path, name):
    trunk = model_lib.build_trunk("vit", **MANIFESTS[name]["config"], **OPTIONS[name])
    params, state, target = load_target(trunk)
    expected = OUTPUTS[name]
    heads = {"heads.head.weight": torch.zeros(10, 64), "heads.head.bias": torch.zeros(10)} if "logits" in expected else {}
    target |= heads
    loaded, report = load_into(target, {"path": str(archive(reference, name, tmp_path)), "load_heads": bool(heads)})
    assert report.format == "auto (flax_vit names)" and report.trunk_loaded == report.trunk_total
    images = reference.seeded_images(2, expected["input_size"], seed=expected["input_seed"])
    features = ("lastPOOL", "lastCLS") if "cls" in expected else ("lastPOOL",)
    out, _ = trunk.apply(*loaded_trees(loaded, params, state), images, train=False, features=features)
    assert_close_to_largest(out["lastPOOL"], expected["patch_mean"], name)
    if "cls" in expected:  # and its classifier, head/kernel [D, classes], as the head "head"
        assert_close_to_largest(out["lastCLS"], expected["cls"], name)
        logits = out["lastCLS"] @ loaded["heads.head.weight"].T + loaded["heads.head.bias"]
        assert_close_to_largest(logits, expected["logits"], name)


def test_layouts_become_pytorchs():
    d, heads, dh = 6, 2, 3
    arrays = {"conv/kernel": np.arange(2 * 2 * 3 * d, dtype=np.float32).reshape(2, 2, 3, d),
              "Dense_0/kernel": np.arange(4 * d, dtype=np.float32).reshape(4, d),
              "attn/query/kernel": np.arange(d * heads * dh, dtype=np.float32).reshape(d, heads, dh),
              "attn/query/bias": np.arange(heads * dh, dtype=np.float32).reshape(heads, dh),
              "attn/out/kernel": np.arange(heads * dh * d, dtype=np.float32).reshape(heads, dh, d),
              "LayerNorm_0/scale": np.ones(d, np.float32),
              "Transformer/encoderblock/LayerNorm_0/bias": np.stack([np.full(d, i, np.float32) for i in range(3)])}
    out = flax_layout.to_torch(arrays)
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    assert torch.equal(out["conv.weight"], t["conv/kernel"].permute(3, 2, 0, 1))  # OIHW
    assert torch.equal(out["Dense_0.weight"], t["Dense_0/kernel"].T)
    # y = x @ q.reshape(d, heads*dh) as nn.Linear: weight [heads*dh, d]
    x = torch.randn(5, d)
    q = torch.einsum("nd,dhk->nhk", x, t["attn/query/kernel"]).reshape(5, -1)
    assert torch.allclose(torch.nn.functional.linear(x, out["attn.query.weight"], out["attn.query.bias"]),
                          q + t["attn/query/bias"].reshape(-1))
    y = torch.randn(5, heads, dh)
    o = torch.einsum("nhk,hkd->nd", y, t["attn/out/kernel"])
    assert torch.allclose(torch.nn.functional.linear(y.reshape(5, -1), out["attn.out.weight"]), o)
    assert torch.equal(out["LayerNorm_0.weight"], torch.ones(d))
    for i in range(3):  # scanned blocks, one per index of the leading axis
        assert torch.equal(out[f"Transformer.encoderblock_{i}.LayerNorm_0.bias"], torch.full((d,), float(i)))


def test_bfloat16_arrays_read_as_bfloat16(tmp_path):
    values = torch.randn(4, 3).to(torch.bfloat16)
    path = tmp_path / "bf16.npz"
    np.savez(path, **{"Dense_0/kernel": values.view(torch.int16).numpy().view("V2")})
    assert torch.equal(io.read(path)["Dense_0.weight"], values.T)


def test_npz_is_sniffed_from_its_bytes_and_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "weights.pth"  # the name says nothing
    np.savez(path.with_suffix(""), a=np.zeros(2, np.float32))
    path.with_suffix(".npz").rename(path)
    assert io.sniff(str(path)) == "npz"
    torch.save({"a": torch.zeros(2)}, tmp_path / "torch.pth")
    assert io.sniff(str(tmp_path / "torch.pth")) == "zip"
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "objects.npz", a=np.array([Payload(marker)], dtype=object))
    with pytest.raises(WeightsError, match="an .npz may hold only arrays, not pickled objects"):
        io.read(tmp_path / "objects.npz")
    assert not marker.exists()


def test_an_npz_that_would_unpack_far_beyond_its_size_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, a=np.zeros(1 << 20, np.float32))  # 4 MiB of zeros in a few KiB
    assert sum(i.file_size for i in zipfile.ZipFile(path).infolist()) > 100 * path.stat().st_size
    monkeypatch.setattr(io, "MIN_NPZ_REFUSED", 1 << 20)
    with pytest.raises(WeightsError, match="a decompression bomb"):
        io.read(path)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
