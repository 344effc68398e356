"""``python -m fpipe.weights inspect|convert|export``."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpipe.weights import cli, detect, io, load_into
from fpipe.weights import WeightsError
from test_weights_fixtures import MANIFEST, layouts, seeded, state_dict, target, trunk

REPO = Path(__file__).resolve().parents[1]
HAS_RESNET = importlib.util.find_spec("fpipe.models.resnet") is not None


def run(argv, capsys):
    code = cli.main([str(a) for a in argv], build_target=lambda args, files: (target(), "resnet18 (test)"))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def moco(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "moco.pth.tar"
    torch.save(layouts()["moco_v2"][0], path)
    return path


def test_inspect_outlines_candidates_choice_and_leftovers(moco, capsys):
    code, out, _ = run(["inspect", moco], capsys)
    assert code == 0
    assert "state_dict: 250 tensors" in out and "epoch: int 200" in out and "param_groups: list" in out
    assert "module.encoder_q.* (124), module.encoder_k.* (124), module.* (2)" in out
    assert "state_dict.module.encoder_q.: 100/100 trunk tensors" in out and "trunk: resnet18 (test)" in out
    assert "state_dict.module.encoder_k.: 100/100 trunk tensors" in out
    assert "by convention: MoCo" in out and "remove_prefix='module.encoder_q.'" in out
    assert "outside the chosen copy 'state_dict.module.encoder_q.': state_dict.module.encoder_k.* (124)" in out
    assert len(out.splitlines()) < 40  # one screen


def test_inspect_ambiguous_file_lists_candidates(tmp_path, capsys):
    path = tmp_path / "two.pth"
    torch.save({"a": trunk(0), "b": trunk(1)}, path)
    code, out, err = run(["inspect", path], capsys)
    assert code == 1 and "a.: 100/100" in out and "no convention decides" in err


def test_convert_writes_torchvision_names(moco, tmp_path, capsys):
    out_path = tmp_path / "r18.safetensors"
    code, out, _ = run(["convert", moco, out_path], capsys)
    assert code == 0 and "100/100" in out
    got = io.read(out_path)
    want = [row for row in MANIFEST if not row[0].startswith("fc.")]
    assert sorted(got) == sorted(r[0] for r in want)
    assert all(list(got[n].shape) == s and str(got[n].dtype) == d for n, s, d in want)
    assert all(torch.equal(got[n], t) for n, t in trunk(0).items())


def test_convert_with_heads_is_torchvision_strict(tmp_path, capsys):
    src = tmp_path / "backbone.pth"
    torch.save({f"backbone.{n}": t for n, t in state_dict(3).items()}, src)
    out_path = tmp_path / "r18.pth"
    assert run(["convert", src, out_path, "--heads"], capsys)[0] == 0
    got = torch.load(out_path, weights_only=True)
    assert list(got) == [row[0] for row in MANIFEST]  # torchvision's order too
    assert all(torch.equal(got[n], t) for n, t in state_dict(3).items())  # counters kept


def test_export_round_trip_is_exact(tmp_path, capsys):
    sd = state_dict(5)
    params = {f"trunk.{n}": t for n, t in sd.items() if "running" not in n and "tracked" not in n and "fc" not in n}
    params |= {"heads.fc.weight": sd["fc.weight"], "heads.fc.bias": sd["fc.bias"]}
    model_state = {f"trunk.{n}": t + 0 for n, t in sd.items() if "running" in n or "tracked" in n}
    model_state["trunk.bn1.num_batches_tracked"] = torch.tensor(123)
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    torch.save({"params": {}, "model_state": {}}, workdir / "checkpoints" / "ckpt_00000010.pt")
    torch.save({"params": params, "model_state": model_state, "step": 20}, workdir / "checkpoints" / "ckpt_00000020.pt")
    out_path = tmp_path / "export.safetensors"
    code, out, _ = run(["export", workdir, out_path], capsys)
    assert code == 0 and "ckpt_00000020.pt" in out
    plain = io.read(out_path)
    assert set(plain) == {row[0] for row in MANIFEST}
    back, report = load_into(target(heads=True), {"path": str(out_path), "format": "torchvision",
                                                  "load_heads": True, "skip_layers": []})
    original = params | model_state
    assert back.keys() == original.keys()
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in original.items())


def test_export_of_a_checkpoint_with_an_average_says_which_copy_and_ema_exports_the_average(tmp_path, capsys):
    sd = state_dict(5)
    params = {f"trunk.{n}": t for n, t in sd.items() if "running" not in n and "tracked" not in n and "fc" not in n}
    model_state = {f"trunk.{n}": t for n, t in sd.items() if "running" in n or "tracked" in n}
    trained = sorted(n for n in params if n.startswith("trunk.layer4."))  # the rest frozen: not averaged
    average = {"params": {n: params[n] * 0.5 for n in trained},
               "model_state": {n: t * 2 if t.is_floating_point() else t for n, t in model_state.items()}}
    ckpt = tmp_path / "ckpt_00000004.pt"
    torch.save({"params": params, "model_state": model_state, "ema": average, "step": 4}, ckpt)
    code, out, _ = run(["export", ckpt, tmp_path / "live.pth"], capsys)
    assert code == 0 and "--ema exports their average" in out
    live = torch.load(tmp_path / "live.pth", weights_only=True)
    assert all(torch.equal(live[n[len("trunk."):]], t) for n, t in (params | model_state).items())
    code, out, _ = run(["export", ckpt, tmp_path / "ema.pth", "--ema"], capsys)
    assert code == 0 and "the average of its trained weights" in out
    got = torch.load(tmp_path / "ema.pth", weights_only=True)
    expected = params | model_state | average["params"] | average["model_state"]
    assert trained and all(torch.equal(got[n[len("trunk."):]], t) for n, t in expected.items())
    torch.save({"params": params, "model_state": model_state, "step": 4}, ckpt)
    code, _, err = run(["export", ckpt, tmp_path / "x.pth", "--ema"], capsys)
    assert code == 1 and "holds no average" in err


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    code, out, err = run(["convert", tmp_path / "missing.pth", tmp_path / "o.pth"], capsys)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'missing.pth'}: no such file."
    code, _, err = run(["export", tmp_path, tmp_path / "o.pth"], capsys)
    assert code == 1 and "no checkpoints/ckpt_<step>.pt" in err and len(err.strip().splitlines()) == 1
    plain = tmp_path / "plain.pth"
    torch.save(trunk(0), plain)
    code, _, err = run(["export", plain, tmp_path / "o.pth"], capsys)
    assert code == 1 and "not an fpipe checkpoint" in err


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(moco, tmp_path, capsys):
    """convert X X, or export a workdir onto its own checkpoint through last.pt: writing the output
    over the file being read (its tensors mapped from it) destroyed both."""
    src = tmp_path / "in.pth"
    src.write_bytes(moco.read_bytes())
    code, _, err = run(["convert", src, src], capsys)
    assert code == 1 and f"{src} is the file being read" in err and src.read_bytes() == moco.read_bytes()
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    sd = state_dict(5)
    ckpt = workdir / "checkpoints" / "ckpt_00000020.pt"
    torch.save({"params": {f"trunk.{n}": t for n, t in sd.items() if "running" not in n and "tracked" not in n},
                "model_state": {}}, ckpt)
    (workdir / "checkpoints" / "last.pt").symlink_to(ckpt.name)
    before = ckpt.read_bytes()
    code, _, err = run(["export", workdir, workdir / "checkpoints" / "last.pt"], capsys)
    assert code == 1 and "is the file being read" in err and ckpt.read_bytes() == before


def test_a_failed_write_leaves_the_old_output_as_it_was(moco, tmp_path, monkeypatch):
    out_path = tmp_path / "r18.pth"
    out_path.write_bytes(b"an earlier export")

    def fail(obj, f):  # half a file, then the disk is full
        (open(f, "wb") if isinstance(f, (str, os.PathLike)) else f).write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        io.write(trunk(0), out_path)
    assert out_path.read_bytes() == b"an earlier export" and list(tmp_path.iterdir()) == [out_path]


def test_module_entry_point_fails_in_one_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "fpipe.weights", "inspect", str(tmp_path / "nope.pth")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr == f"error: {tmp_path / 'nope.pth'}: no such file.\n"


@pytest.mark.skipif(not HAS_RESNET, reason="fpipe.models.resnet not written yet")
def test_convert_with_the_real_model_matches_the_manifest(moco, tmp_path):
    out_path = tmp_path / "r18.pth"
    assert cli.main(["convert", str(moco), str(out_path), "--depth", "18"]) == 0  # fpipe.models.resnet
    got = torch.load(out_path, weights_only=True)
    assert [[n, list(t.shape), str(t.dtype)] for n, t in got.items()] == [r for r in MANIFEST if not r[0].startswith("fc.")]
    assert all(torch.equal(got[n], t) for n, t in trunk(0).items())


def test_help_imports_no_torch_and_every_option_is_explained():
    code = ("import runpy, sys\n"
            "for argv in (['-h'], ['inspect', '-h'], ['convert', '-h'], ['export', '-h']):\n"
            "    sys.argv = ['fpipe.weights', *argv]\n"
            "    try:\n"
            "        runpy.run_module('fpipe.weights', run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0\n"
            "print('torch loaded:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("torch loaded: False") and "--stub-objects" in done.stdout
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.choices and "inspect" in a.choices).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_cli_formats_are_the_configs():
    from fpipe.weights import config
    assert cli.FORMATS == config.FORMATS


@pytest.mark.skipif(not HAS_RESNET, reason="fpipe.models.resnet not written yet")
def test_the_trunk_is_inferred_from_the_file(tmp_path, capsys):
    """A ResNet-18 file with no --trunk/--depth is a ResNet-18, not a ResNet-50 with shape errors."""
    path = tmp_path / "moco_r18.pth.tar"
    torch.save(layouts()["moco_v2"][0], path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trunk: resnet --depth 18 --width-multiplier 1 (inferred: basic blocks [2, 2, 2, 2]" in out
    out_path = tmp_path / "r18.pth"
    assert cli.main(["convert", str(path), str(out_path)]) == 0
    got = torch.load(out_path, weights_only=True)
    assert all(torch.equal(got[n], t) for n, t in trunk(0).items())


def test_convert_of_a_file_without_batchnorm_counters_writes_them_at_zero(tmp_path, capsys):
    """FrozenBatchNorm files (detectron2's, and many exports) carry no num_batches_tracked."""
    sd = {n: t for n, t in trunk(0).items() if not n.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "no_counters.pth")
    assert cli.main(["convert", str(tmp_path / "no_counters.pth"), str(tmp_path / "out.pth")]) == 0
    got = torch.load(tmp_path / "out.pth", weights_only=True)
    assert got["bn1.num_batches_tracked"].dtype == torch.int64 and got["bn1.num_batches_tracked"] == 0
    assert all(torch.equal(got[n], t) for n, t in sd.items())


def test_infer_reads_resnext_and_wide_resnet_options():
    from fpipe.weights import infer
    for model, want in [("resnext50_32x4d", {"depth": 50, "groups": 32, "width_per_group": 4}),
                        ("wide_resnet50_2", {"depth": 50, "groups": 1, "width_per_group": 128}),
                        ("resnet152", {"depth": 152, "groups": 1, "width_per_group": 64})]:
        rows = seeded.load_manifest(model)
        files = {f"module.encoder.{n}": torch.zeros(()).expand(s) for n, s, _ in rows}
        name, options, why = infer.infer_trunk(files)
        assert name == "resnet" and {k: options[k] for k in want} == want, (model, options)
        assert "module.encoder." in why


def test_infer_matches_other_families_against_presets():
    from fpipe.weights import infer
    rows = seeded.load_manifest("vit_base_patch16_224")
    files = {f"teacher.backbone.{n}": torch.zeros(()).expand(s) for n, s, _ in rows}
    vit_target = {f"trunk.{n}": torch.zeros(()).expand(s) for n, s, _ in seeded.load_manifest("vit_b_16")
                  if not n.startswith("heads.")}
    small = {n: torch.zeros(()).expand(t.shape[:-1] + (t.shape[-1] // 2,)) for n, t in vit_target.items()}
    presets = {"vit_tiny": ("vit", {}, lambda: small), "vit_b_16": ("vit", {}, lambda: vit_target)}
    name, _, why = infer.infer_trunk(files, presets)
    assert name == "vit_b_16" and "teacher.backbone." in why
    with pytest.raises(WeightsError, match="pass --trunk NAME"):
        infer.infer_trunk({"a.weight": torch.zeros(3)}, presets)
    # A shallower preset's names and shapes all sit in a deeper one's file: the deeper is the file's.
    first_blocks = {n: t for n, t in vit_target.items() if not n.startswith("trunk.encoder.layers.encoder_layer_1")}
    presets = {"vit_shallow": ("vit", {}, lambda: first_blocks), "vit_b_16": ("vit", {}, lambda: vit_target)}
    assert len(first_blocks) < len(vit_target) and infer.infer_trunk(files, presets)[0] == "vit_b_16"
    # A 384 px preset takes a 224 px file too (its position grid resampled): the file's own grid wins,
    # whichever order the presets come in.
    grid_384 = {**vit_target, "trunk.encoder.pos_embedding": torch.zeros(()).expand(1, 577, 768)}
    for order in ((("vit_b_16_384", grid_384), ("vit_b_16", vit_target)),
                  (("vit_b_16", vit_target), ("vit_b_16_384", grid_384))):
        presets = {n: ("vit", {}, lambda t=t: t) for n, t in order}
        name, _, why = infer.infer_trunk(files, presets)
        assert name == "vit_b_16" and "vit_b_16_384" not in why, why


@pytest.mark.skipif(not HAS_RESNET, reason="fpipe.models.resnet not written yet")
def test_every_registry_name_is_accepted(moco, capsys):
    """Each family and preset builds a shape-only (meta) target; no weights are allocated (Swin's
    index tables, derived from the window size, keep their values so that convert writes them)."""
    parser = cli._parser()
    for name in cli.registry():
        args = parser.parse_args(["inspect", "f.pth", "--trunk", name])
        target, described = cli.registry_target(args, {})
        assert target and described.startswith(name)
        assert all(t.is_meta for n, t in target.items() if not detect.is_derived(n)), name
    assert cli.main(["inspect", str(moco), "--trunk", "resnet", "--depth", "18"]) == 0


@pytest.mark.skipif(not HAS_RESNET, reason="fpipe.models.resnet not written yet")
def test_bad_depth_trunk_and_missing_directory_are_one_line_errors(moco, tmp_path, capsys):
    assert cli.main(["convert", str(moco), str(tmp_path / "o.pth"), "--depth", "51"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --trunk resnet --depth 51: unknown ResNet depth 51; valid: [18, 34") and err.count("\n") == 1
    assert cli.main(["inspect", str(moco), "--trunk", "resnet_51"]) == 1
    err = capsys.readouterr().err
    assert "--trunk 'resnet_51': unknown; valid: " in err and err.count("\n") == 1
    missing = tmp_path / "no" / "such" / "dir" / "o.safetensors"
    assert cli.main(["convert", str(moco), str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {missing}: the directory {missing.parent} does not exist; create it or write elsewhere.\n"
    assert cli.main(["export", str(moco), str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["convert", str(moco), str(tmp_path)]) == 1  # a directory, not a file name
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} is a directory: give the output file's name") and err.count("\n") == 1


def test_stub_objects_flag_reads_an_mmengine_checkpoint(tmp_path, monkeypatch, capsys):
    from test_weights_formats import mmengine_checkpoint
    path = mmengine_checkpoint(tmp_path, monkeypatch)
    code, _, err = run(["inspect", path], capsys)
    assert code == 1 and "--stub-objects" in err
    code, out, _ = run(["inspect", path, "--stub-objects"], capsys)
    assert code == 0 and "stand-ins" in out and "100/100" in out


def test_a_timm_efficientnet_file_is_inferred_inspected_and_converted(tmp_path, capsys):
    """timm names in, the efficientnet_b0 preset inferred (by renames.TIMM_EFFICIENTNET), torchvision names out."""
    from test_weights_formats import timm_efficientnet_modules
    from fpipe.models import efficientnet
    rows = [r for r in seeded.load_manifest("efficientnet_b0") if not r[0].startswith("classifier.")]
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _, _ in rows))
    timm = dict(zip(modules, timm_efficientnet_modules(efficientnet.build().spec)))
    sd = {n: torch.full((), float(i)).expand(s).clone() for i, (n, s, _) in enumerate(rows)}
    path, out_path = tmp_path / "timm_b0.pth", tmp_path / "b0.safetensors"
    torch.save({f"{timm[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}": t for n, t in sd.items()}, path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trunk: efficientnet_b0" in out and "after the timm_efficientnet rename table" in out
    assert "trunk: 309/309 tensors loaded" in out and "MISSING" not in out
    assert cli.main(["convert", str(path), str(out_path)]) == 0
    got = io.read(out_path)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[n], t) for n, t in sd.items())


def test_convert_refuses_a_deeper_resnet_into_a_shallower_trunk(tmp_path, capsys):
    """--trunk resnet18 on a ResNet-34 file would write a truncated ResNet-34 as a ResNet-18."""
    from test_weights_detect import registry_trunk
    path = tmp_path / "r34.pth"
    torch.save(registry_trunk("resnet34"), path)
    assert cli.main(["convert", str(path), str(tmp_path / "r18.safetensors"), "--trunk", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "80 file tensors belong to trunk blocks the model does not have" in err
    assert "the file holds resnet34" in err and "set model.trunk.name=resnet34" in err
    assert not (tmp_path / "r18.safetensors").exists()
    assert cli.main(["convert", str(path), str(tmp_path / "r34.safetensors")]) == 0  # inferred: resnet34
