"""The benchmarks' own housekeeping (the compile caches they make are gone when they exit, a cache
directory the user names is kept) and their baselines (the zoo's and the ViTs' nn.Module twins are
fpipe's network)."""
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
import torch

from fpipe import tree
from fpipe.models import model as models

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ("import os; from benchmarks.linear_eval_step import own_compile_cache, scratch_dir; "
          "own_compile_cache(); extra = scratch_dir('fpipe-test-'); "
          "open(os.path.join(os.environ['FPIPE_COMPILE_CACHE'], 'step.pt2'), 'w').write('x'); "
          "print(os.environ['FPIPE_COMPILE_CACHE']); print(extra)")


def run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [pathlib.Path(line) for line in out.stdout.split()]


def test_a_benchmarks_own_compile_cache_is_removed_when_it_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FPIPE_COMPILE_CACHE"}
    cache, extra = run({**env, "TMPDIR": str(tmp_path)})
    assert cache.parent == tmp_path and extra.parent == tmp_path  # they were made, here
    assert not cache.exists() and not extra.exists()


def test_a_compile_cache_the_user_names_is_kept(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    cache, _ = run({**os.environ, "FPIPE_COMPILE_CACHE": str(mine), "TMPDIR": str(tmp_path)})
    assert cache == mine and (mine / "step.pt2").read_text() == "x"


@pytest.mark.parametrize("family,options", [("convnext", dict(channels=(8, 16, 16, 16), depths=(1, 1, 1, 1))),
                                            ("convnext", dict(channels=(8, 16, 16, 16), depths=(1, 1, 1, 1), grn=True,
                                                              layer_scale=0.0)),
                                            ("swin", dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                                                          window_size=3)),
                                            ("efficientnet", dict(width_mult=0.25, depth_mult=0.3)),
                                            ("regnet", dict(depth=5, w_0=8, w_a=12, w_m=2.0, group_width=8,
                                                            stem_width=8, se_ratio=0.25))])
def test_the_baselines_zoo_modules_compute_fpipes_network(family, options):
    """benchmarks/zoo_modules.py's twins hold fpipe's weights by name and give its logits and
    gradients in train mode (batch statistics), so a benchmark times the same network."""
    from benchmarks import zoo_modules
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(family, **options),
                                         heads=dict(fc=models.head_config("flatten", "linear"))))
    model = models.build(cfg, num_classes=5, image_size=32)
    params, state = model.init(0)
    net = zoo_modules.torch_module(model.trunk.spec, params, state, 5).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # float32: within float rounding of each gradient's largest value
    assert_module_computes(net, model, params, state, x, logits_tol=(1e-4, 1e-5), grad_tol=(0.0, 1e-3, 1e-6))


def assert_module_computes(net, model, params, state, x, logits_tol, grad_tol):
    """The nn.Module ``net`` (train mode) gives fpipe's logits and gradients of a loss on them on
    ``x``; tolerances ``(rtol, atol)``, the gradients' ``(rtol, atol relative to each one's
    largest value, atol)``."""
    def loss(p):
        out, _ = model.apply(p, state, x, train=True)
        return out["fc"].square().mean(), out["fc"]

    grads, logits = torch.func.grad(loss, has_aux=True)(params)
    mine = net(x)
    mine.square().mean().backward()
    torch.testing.assert_close(mine, logits, rtol=logits_tol[0], atol=logits_tol[1])
    named = dict(net.named_parameters())
    for name, g in tree.flatten(grads).items():
        torch.testing.assert_close(named[name.split(".", 1)[1]].grad, g, rtol=grad_tol[0],
                                   atol=grad_tol[1] * g.abs().max().item() + grad_tol[2], msg=lambda m: f"{name}: {m}")


def test_train_steps_baselines_with_a_frozen_stem_train_what_fpipe_trains():
    """train_step.py's ``--freeze``: the nn.Module baseline takes no gradient for the frozen params,
    runs their norms on running statistics, and its steps give fpipe's losses and updates."""
    from benchmarks import train_step
    s = train_step.setup("finetune", 18, 32, 4, freeze_rules=(r"trunk\.(conv1|bn1|layer1)\..*",))
    s["lr"] = 1e-3  # both programs' lr: small enough that float rounding does not grow over the steps
    assert {n for n in tree.flatten(s["frozen"]) if "layer1" in n} and "trunk.bn1" in s["eval_norms"]
    net = train_step.torch_net(s)
    assert not net.conv1.weight.requires_grad and not net.layer1[0].bn1.training
    assert net.layer2[0].conv1.weight.requires_grad and net.layer2[0].bn1.training
    fpipe_run = train_step.fpipe_program(s, compiling=False)
    module_run = train_step.module_program(s, compiled=False, channels_last=True)
    for _ in range(3):
        torch.testing.assert_close(module_run(), fpipe_run(), rtol=1e-4, atol=1e-5)


def test_train_loops_split_file_gives_main_py_the_baselines_images(tmp_path):
    """benchmarks/train_loop.py: main.py reads the folder through the split file it writes; that
    must be the images and classes the hand-written loop's DataLoader reads, and the test split
    ``test_images`` spread over the folder, held out of both (class names that sort apart as
    numbers and as text)."""
    from PIL import Image
    from benchmarks import train_loop
    from fpipe import data
    for name, count in (("2", 3), ("10", 2), ("cat", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", (8, 6), (k * 40, 0, 0)).save(tmp_path / "train" / name / f"{k}.jpg")
    args = ml_collections.ConfigDict(dict(dir=str(tmp_path), images=6))
    files, labels, classes, generated = train_loop.folder_images(args)
    assert not generated and len(files) == 6
    split = train_loop.split_file(files, labels, classes, test_images=2)
    cfg = data.default_config()
    cfg.update(dict(name="image_folder", root=str(tmp_path), split_file=split, train_split="train", test_split="test"))
    ds = data.build(cfg)
    by_file = lambda s: {f: ds.classes[int(k)] for f, k in zip(s.files, s.labels)}
    theirs = {f: classes[k] for f, k in zip(files, labels)}
    train, test = train_loop.held_out(files, labels, 2)
    assert by_file(ds.train) == {f: classes[k] for f, k in train} and len(train) == 4
    assert by_file(ds.test) == {f: theirs[f] for f in (files[0], files[3])} and [f for f, _ in test] == [files[0], files[3]]
    assert {pathlib.Path(f).parent.name for f in theirs} == {"2", "10", "cat"}
    assert all(pathlib.Path(f).parent.name == c for f, c in theirs.items())


@pytest.mark.parametrize("name", ["resnext50_32x4d", "resnet50x2"])
def test_the_baselines_named_resnets_compute_fpipes_network(name):
    """linear_eval_step.py's nn.Module for a named ResNet (grouped or wider convs, a wider stem)
    holds fpipe's weights by name and gives its logits and gradients in train mode."""
    from benchmarks import linear_eval_step as le
    model, params, state, batch = le.build(name, 32, 4)
    params, state = (tree.map_leaves(lambda v: v.double() if v.is_floating_point() else v, t) for t in (params, state))
    image = batch["image"].double()  # float64: a deep trunk's rounding does not hide a wrong layer
    net = le.torch_module(name, params, state).double().train()  # fpipe's float32 values, exactly
    assert_module_computes(net, model, params, state, image, logits_tol=(1e-9, 1e-9), grad_tol=(1e-7, 1e-9, 1e-12))


@pytest.mark.parametrize("preset,feature", [("vit_b_16", "lastCLS"),
                                            ("vit_small_patch14_reg4_dinov2", "cls4_avgpool"),
                                            ("deit_small_distilled_patch16_224", "concatPOOL4"),
                                            ("vit_giant_patch14_dinov2", "cls1_avgpool"),
                                            ("vit_b_16+fc_norm", "lastPOOL"),
                                            ("beit_base_patch16_224", "concatPOOL4"),
                                            ("beit_base_patch16_224_pt22k", "cls1_avgpool")])
def test_the_baselines_vit_computes_fpipes_network(preset, feature):
    """vit_step.py's nn.Module twin (also train_step.py's for ViT presets): registers, layer scale,
    position rows for the patches only, the distillation token, SwiGLU and BEiT's relative position
    bias as fpipe's presets have them; it holds fpipe's weights by name and gives its logits and gradients on each
    linear-evaluation feature. Small widths of each preset's layout; float64."""
    from benchmarks import vit_step
    from fpipe.models import vit
    preset, _, flag = preset.partition("+")  # "+fc_norm": MAE's global pool (no preset has it)
    options = dict(vit.PRESETS[preset], hidden_dim=32, depth=4, heads=2, mlp_dim=48, **({flag: True} if flag else {}))
    options["image_size"] = 2 * options["patch_size"]
    cfg = ml_collections.ConfigDict(dict(trunk=dict(name="vit", **options),
                                         heads=dict(fc=models.head_config(feature, "linear"))))
    model = models.build(cfg, num_classes=5, image_size=options["image_size"])
    params, state = model.init(0)
    gen = torch.Generator().manual_seed(1)  # not the init's values: layer scale and tokens that matter
    params = tree.map_leaves(lambda v: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 0.5, params)
    net = vit_step.ViT(model.trunk.spec, 5, feature).double()
    net.load_state_dict({n.split(".", 1)[1]: v for n, v in tree.flatten(params).items()}, strict=True)
    image = torch.randn(3, 3, options["image_size"], options["image_size"], generator=gen, dtype=torch.float64)
    assert_module_computes(net.train(), model, params, state, image, logits_tol=(1e-9, 1e-9), grad_tol=(1e-7, 1e-9, 1e-12))


def test_a_vit_size_off_its_patch_grid_is_refused_before_anything_runs(capsys):
    """vit_step.py and train_step.py name the preset, its patch size and sizes that fit."""
    from benchmarks import train_step, vit_step
    for main, argv in ((vit_step.main, ["--name", "vit_small_patch14_reg4_dinov2", "--image-size", "64"]),
                       (train_step.main, ["--arch", "vit_small_patch14_reg4_dinov2", "--image-size", "56", "60"])):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert "--image-size " + argv[-1] + ": vit_small_patch14_reg4_dinov2 takes multiples of its patch size 14" in err, err


CHILD = ("import sys, time; from benchmarks import process_rounds; calls = [0]\n"
         "def run():\n"
         "    calls[0] += 1; time.sleep(float(sys.argv[1])); return calls[0]\n"
         "if sys.argv[2] == 'fail': raise SystemExit('no program here')\n"
         "print('a line that is not the protocol'); process_rounds.serve(run, warmup=2)\n")


def test_process_rounds_time_each_program_in_its_own_process():
    """process_rounds: each program's first and warm-up outputs, its own step time (not another's),
    one process per program; a program whose process dies names itself."""
    from benchmarks import process_rounds
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = {"quick": [sys.executable, "-c", CHILD, "0.01", "ok"], "slow": [sys.executable, "-c", CHILD, "0.08", "ok"]}
    median, first, outputs = process_rounds.time_round_robin(commands, iters=3, warmup=2, env=env)
    assert outputs == {"quick": [1.0, 2.0], "slow": [1.0, 2.0]}
    assert 0.01 <= median["quick"] < 0.06 <= 0.08 <= median["slow"]
    assert first["slow"] >= 0.08
    with pytest.raises(RuntimeError, match="the broken program's process ended"):
        process_rounds.time_round_robin({"quick": commands["quick"], "broken": [sys.executable, "-c", CHILD, "0", "fail"]},
                                        iters=1, warmup=1, env=env)


def test_input_pipeline_generates_the_encoding_asked_for_and_refuses_a_set_made_otherwise(tmp_path):
    """benchmarks/input_pipeline.py: JPEGs in the encoding and size asked for; a folder generated
    with other settings is refused, never timed as if it held the set asked for."""
    from PIL import Image
    from benchmarks import input_pipeline
    root = str(tmp_path / "set")
    encoding = dict(progressive=True, subsampling="4:4:4", size=0.5)
    assert input_pipeline.make_jpegs(root, 2, encoding=encoding)
    files = sorted(pathlib.Path(root).glob("train/*/*.jpg"))
    assert len(files) == 2
    for f in files:
        with Image.open(f) as image:
            assert image.info.get("progressive") and max(image.size) <= 320
            assert image.layer[0][1:3] == image.layer[1][1:3]  # no chroma subsampling
    assert input_pipeline.make_jpegs(root, 2, encoding=encoding)  # the same set: reused
    with pytest.raises(SystemExit, match="generated otherwise"):
        input_pipeline.make_jpegs(root, 2)
    assert input_pipeline.encoding_tag(input_pipeline.ENCODING) == ""
    # The default folders: one per set, so input_pipeline.py's 2,000 JPEGs and train_loop.py's
    # 1,280 (or steps × batch) never meet in one folder, which make_jpegs would refuse.
    dirs = {input_pipeline.default_dir(2000), input_pipeline.default_dir(1280),
            input_pipeline.default_dir(1280, encoding), input_pipeline.default_dir(1280, dict(progressive=True))}
    assert len(dirs) == 4 and input_pipeline.default_dir(1280) == input_pipeline.default_dir(1280, {})
    assert input_pipeline.encoding_tag({**input_pipeline.ENCODING, **encoding}) == "progressive_size0.5_subsampling444"


def test_gpu_steps_diagnostics_say_where_a_step_and_a_compile_spend_their_time(capsys):
    """benchmarks/gpu_step.py's --trace-steps and --profile-first-call (for a GPU lease): the step's
    wall time against its operators' busy time, with the operator that took it; the compile's
    profile keeps the compiler's calls (a compiler run is a subprocess) and drops the rest."""
    from benchmarks import gpu_step
    a = torch.randn(256, 256)
    gpu_step.print_step_trace("matmuls", lambda: [a @ a for _ in range(20)], torch.device("cpu"), steps=2)
    out = capsys.readouterr().out
    wall, busy = (float(out.split(word)[0].split()[-1]) for word in (" ms a step", " ms ("))
    assert 0 < busy <= wall * 1.05 and "aten::mm" in out.split("\n", 1)[1].splitlines()[3]

    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
    torch.compile(lambda x: x.sin() + 1)(torch.ones(3))  # inductor, its C++ compiler in a subprocess
    sorted(range(1000), key=lambda i: -i)
    profiler.disable()
    gpu_step.print_compile_profile(profiler, 40)
    by_cumulative = capsys.readouterr().out.split("Ordered by: internal time")[0]
    assert "torch/_inductor/compile_fx.py" in by_cumulative and "<lambda>" not in by_cumulative


def test_gpu_steps_compile_breakdown_says_where_triton_kernels_were_compiled(monkeypatch):
    """``count_triton_compiles``: a Triton kernel compiled before inductor's workers are up is counted
    "here" (in this process: a small graph then waits on each compile in turn), after it "workers";
    the breakdown gives them in order, so a trunk's and a later step's compiles show apart."""
    from torch._inductor.async_compile import AsyncCompile, CompiledTritonKernels
    from benchmarks import gpu_step
    ready = iter([False, True, True, False])
    handed_on = set()  # inductor hands a kernel to its workers while generating code, then asks again on loading

    def compile(self, name, source, device_str="cuda"):
        handed_on.add(source)
        return name
    monkeypatch.setattr(AsyncCompile, "triton", compile)
    monkeypatch.setattr(AsyncCompile, "use_process_pool", classmethod(lambda cls: next(ready)))
    monkeypatch.setattr(CompiledTritonKernels, "get", staticmethod(lambda source: "future" if source in handed_on else None))
    monkeypatch.setattr(gpu_step, "TRITON_COMPILES", [])
    gpu_step.count_triton_compiles()
    gpu_step.count_triton_compiles()  # once only: a second wrapper would count each kernel twice
    assert AsyncCompile().triton("k0", "src0") == "k0"
    before = gpu_step.compile_counts()
    assert [AsyncCompile().triton(k, f"src{k[1]}") for k in ("k1", "k2", "k2", "k3")] == ["k1", "k2", "k2", "k3"]
    assert "(Triton kernels compiled, in order: 2 workers, 1 here)" in gpu_step.compile_breakdown(before)


@pytest.mark.parametrize("depth", [18, 50])
def test_cudnn_fusions_written_out_trunk_computes_the_models_features(depth):
    """benchmarks/cudnn_fusion.py times cuDNN's fused conv+bias+ReLU against fpipe's trunk on the
    same folded weights, written out block by block: that walk (basic and bottleneck blocks, the
    stride in the 3x3 conv, the downsample path) must compute the model's own pooled features."""
    from benchmarks import cudnn_fusion, linear_eval_step as le
    model, params, state, batch = le.build(depth, 32, 2)
    folded = cudnn_fusion.folded_weights(params, state)
    with torch.no_grad():
        ours = cudnn_fusion.folded_trunk(folded, cudnn_fusion.plain_ops())(batch["image"])
        theirs = model.features(params, state, batch["image"], ["flatten"])["flatten"].flatten(1)
    assert ours.shape == theirs.shape == (2, 512 if depth == 18 else 2048)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
