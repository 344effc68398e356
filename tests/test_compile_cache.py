"""Compiled steps saved to disk and loaded by the next run (fpipe.train.compile_cache)."""
import logging
import os
import subprocess
import sys

import ml_collections
import pytest
import torch

import configs.supervised
from fpipe import defaults, freeze, optim, tree
from fpipe.models import layers
from fpipe.models import model as models
from fpipe.train import compile_cache, distributed, loop, remat, row_sums
from fpipe.train import step as step_lib


def tiny_model():
    """A one-block ViT (frozen below: a short compile) and a linear head."""
    cfg = ml_collections.ConfigDict(dict(
        trunk=defaults.trunk("vit", patch_size=4, hidden_dim=32, depth=1, heads=4, mlp_dim=64),
        heads=dict(fc=models.head_config("lastCLS"))))
    return models.build(cfg, num_classes=5, image_size=16)


def tiny_step(weight_decay=1e-4):
    """A real fpipe train step (tiny_model's, the trunk frozen) and its inputs."""
    model = tiny_model()
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, ("trunk",))
    opt_cfg = optim.default_config()
    opt_cfg.momentum, opt_cfg.weight_decay = 0.9, weight_decay
    opt = optim.build(opt_cfg, trainable)
    step = step_lib.make_step(model, opt)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    return step, ts, opt


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (n,), generator=g)}


def assert_same(a, b, exact=True):
    for (n, x), y in zip(tree.flatten(a).items(), tree.leaves(b)):
        if exact:
            assert torch.equal(x, y), n
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=n)


def test_a_saved_step_loads_in_a_new_compile_state_computes_the_same_and_falls_back_on_other_inputs(
        tmp_path, caplog):
    step, ts, opt = tiny_step()
    lr, directory, key = opt.inputs(0.1), str(tmp_path / "cache"), "k" * 64
    not_called = lambda *a: pytest.fail("the fallback ran")
    first = compile_cache.saved_or_compiled(step, (ts, batch(), lr), directory, key, "train step", not_called)
    assert not compile_cache.was_loaded(first) and len(os.listdir(directory)) == 1
    assert os.stat(directory).st_mode & 0o777 == 0o700
    out1, m1 = first(ts, batch(), lr)

    torch._dynamo.reset()  # as a new process: nothing traced in memory
    calls = []
    fallback = lambda *a: calls.append(a[1]["image"].shape[0]) or step(*a)
    second = compile_cache.saved_or_compiled(step, (ts, batch(), lr), directory, key, "train step", fallback)
    assert compile_cache.was_loaded(second)
    out2, m2 = second(ts, batch(), lr)
    assert_same(out2, out1)
    assert torch.equal(m2["loss"], m1["loss"]) and calls == []
    eager_out, eager_m = step(ts, batch(), lr)
    assert_same(out2["trainable"], eager_out["trainable"], exact=False)
    torch.testing.assert_close(m2["loss"], eager_m["loss"])

    with caplog.at_level(logging.WARNING):
        out, _ = second(ts, batch(4), lr)  # another batch size: not what was compiled
    assert calls == [4] and "does not fit these inputs" in caplog.text
    assert "'L['batch']['image']' size mismatch at index 0. expected 6, actual 4" in caplog.text  # the guard that failed
    assert_same(out["trainable"], step(ts, batch(4), lr)[0]["trainable"])

    # Another weight decay (the same key: a tensor input of the step) runs the saved step as it is.
    other_step, _, other_opt = tiny_step(weight_decay=0.05)
    out3, _ = second(ts, batch(), other_opt.inputs(0.1))
    assert calls == [4]
    assert_same(out3["trainable"], other_step(ts, batch(), torch.tensor(0.1))[0]["trainable"], exact=False)
    assert not torch.allclose(out3["trainable"]["heads"]["fc"]["weight"], out1["trainable"]["heads"]["fc"]["weight"])


def double(x):
    return x * 2 + 1


def test_a_step_is_saved_per_input_shape_so_that_another_dataset_keeps_its_own(tmp_path):
    """The config's key leaves out the dataset (its name, files, transforms); the inputs' shapes
    (another class count in the heads, another image size) give a file of its own, which the next
    run loads, instead of a saved step whose guards turn them away to an unsaved compile."""
    directory, key = str(tmp_path / "c"), "b" * 64
    ten, hundred = ({"w": torch.zeros(n, 4), "x": torch.ones(2, 4)} for n in (10, 100))
    loaded = lambda args: compile_cache.was_loaded(
        compile_cache.saved_or_compiled(lambda a: a["w"] @ a["x"].T, (args,), directory, key, "toy",
                                        lambda *a: pytest.fail("the fallback ran")))
    assert not loaded(ten) and not loaded(hundred)  # each compiled and saved
    assert len(os.listdir(directory)) == 2
    torch._dynamo.reset()
    assert loaded(ten) and loaded(hundred)
    assert loaded({"w": torch.zeros(100, 4), "x": torch.ones(2, 4)})  # other values, the same shapes
    channels_last = torch.zeros(10, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    assert compile_cache.input_signature((channels_last,)) != compile_cache.input_signature((channels_last.contiguous(),))
    assert compile_cache.input_signature((ten,)) != compile_cache.input_signature(({"x": ten["x"], "w": ten["w"]},))


def test_the_directory_keeps_the_recently_used_steps_within_its_size_bound(tmp_path, monkeypatch):
    """Every new key (another config, an edited fpipe) saves a file: past ``MAX_BYTES`` in all the
    least recently used go, and loading a step counts as using it."""
    directory, key = tmp_path / "c", "e" * 64
    toy = lambda n: compile_cache.saved_or_compiled(
        lambda a: a["w"] @ a["x"].T, ({"w": torch.zeros(n, 4), "x": torch.ones(2, 4)},), str(directory), key, "toy",
        lambda *a: pytest.fail("the fallback ran"))
    saved = []
    for n in (10, 20):
        toy(n)
        saved += [p for p in directory.iterdir() if p not in saved]
    ten, twenty = saved
    for age, path in enumerate(saved):  # both long unused, ten the longer
        os.utime(path, (1e9 + age, 1e9 + age))
    torch._dynamo.reset()
    assert compile_cache.was_loaded(toy(10)) and ten.stat().st_mtime > 1e9 + 10  # loaded: used now
    size = ten.stat().st_size
    monkeypatch.setattr(compile_cache, "MAX_BYTES", size * 5 // 2)  # room for two steps of about this size
    assert not compile_cache.was_loaded(toy(30))  # saved: the third file
    assert ten.exists() and not twenty.exists() and len(list(directory.iterdir())) == 2


def test_the_least_recently_used_compiled_files_go_past_the_size_bound(tmp_path):
    """Packages and saved steps share the bound; files being written by another run stay."""
    names = ["frozen-trunk-a.pt2", "train-step-b.bin", "frozen-trunk-c.pt2", "eval-step-d.bin"]  # a least recent
    for age, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x" * 300)
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))
    (tmp_path / "frozen-trunk-e.99.tmp.pt2").write_bytes(b"x" * 5000)  # other runs writing theirs
    (tmp_path / "train-step-f.bin.99.tmp").write_bytes(b"x" * 5000)
    compile_cache.remove_least_recent(tmp_path, keep=tmp_path / "frozen-trunk-a.pt2", max_bytes=700)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval-step-d.bin", "frozen-trunk-a.pt2", "frozen-trunk-c.pt2", "frozen-trunk-e.99.tmp.pt2",
        "train-step-f.bin.99.tmp"]


@pytest.mark.parametrize("spoil", ["garbage", "world_writable_dir"])
def test_an_unreadable_or_unsafe_file_is_not_loaded(tmp_path, caplog, spoil):
    directory, key, x = str(tmp_path / "c"), "a" * 64, torch.arange(3.0)
    compile_cache.saved_or_compiled(double, (x,), directory, key, "toy", None)
    (path,) = [os.path.join(directory, f) for f in os.listdir(directory)]
    if spoil == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a compiled function")
    else:
        os.chmod(directory, 0o777)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        again = compile_cache.saved_or_compiled(double, (x,), directory, key, "toy", None)
    assert not compile_cache.was_loaded(again)
    assert ("Could not load" if spoil == "garbage" else "writable by no one else") in caplog.text
    assert torch.equal(again(x), double(x))


def test_the_key_follows_the_step_not_the_run_bookkeeping(monkeypatch):
    base = configs.supervised.get_config()
    key = compile_cache.step_key(base, "cpu", "train")

    def changed(**overrides):
        c = configs.supervised.get_config()
        for name, value in overrides.items():
            *path, leaf = name.split("__")
            node = c
            for part in path:
                node = node[part]
            setattr(node, leaf, value)
        return compile_cache.step_key(c, "cpu", "train")

    # The same step: durations, logging, seeds, and the optimizer's numbers (tensor inputs of the
    # step; the weight decay and momentum while they stay non-zero).
    assert changed(total_steps=5, log_steps=3, seed=7, optim__lr=0.3, schedule__warmup_steps=9) == key
    assert changed(cudnn_benchmark=False) == key  # cuDNN's algorithm choice is made when the step runs
    # Which images and how they are read and augmented: the step sees batches, whose shapes key
    # the file (test_a_step_is_saved_per_input_shape).
    assert changed(data__name="image_folder", data__train_transforms="random_resized_crop|flip|normalize",
                   data__eval_transforms="resize(40)|center_crop|normalize", data__test_split="test",
                   data__max_image_pixels=10**6) == key
    # Work outside the step: PreciseBN before evaluations, features after the run, the head grid's
    # validation carve-out, when layer freezing ends.
    assert changed(precise_bn__num_batches=8, extract__features=("res5avg",), head_grid__val_fraction=0.2,
                   layer_freeze__freeze_steps=30) == key
    assert changed(optim__momentum=0.5, optim__weight_decay=1e-3, optim__betas=(0.5, 0.9), optim__eps=1e-3,
                   optim__lars_eta=0.1, optim__scale_lr=True, optim__reference_batch_size=128) == key
    clipped = changed(optim__clip_grad_norm=3.0)
    assert clipped != key and changed(optim__clip_grad_norm=0.5) == clipped  # the bound: an input
    assert changed(optim__clip_grad_norm=0.0) == key and changed(optim__clip_grad_value=1.0) not in (key, clipped)
    # Another step: no decay or no momentum buffer, other optimizer constants, the model, the data's
    # shapes, the step's role.
    for other in (dict(optim__momentum=0.0), dict(optim__weight_decay=0.0), dict(optim__nesterov=True),
                  dict(data__image_size=64), dict(model__trunk__depth=50), dict(precision__dtype="bf16"),
                  dict(compile_remat="off"), dict(compile_remat="all")):
        assert changed(**other) != key, other
    assert compile_cache.step_key(base, "cpu", "eval") != key
    # A step with the fused update takes the lr_mults, wd_mults and Nesterov as inputs: one key for
    # all of them, never a plain step's (test_a_step_saved_with_one_optimizers_rules_runs_anothers).
    fused = compile_cache.step_key(base, "cpu", "train", fused_update=True)
    finetune_rules = dict(optim__nesterov=True, optim__lr_mults=((r"trunk\..*", 0.1),), optim__wd_mults=())
    c = configs.supervised.get_config()
    for name, value in finetune_rules.items():
        setattr(c.optim, name.split("__")[1], value)
    assert compile_cache.step_key(c, "cpu", "train", fused_update=True) == fused != key
    assert changed(**finetune_rules) != key
    # The eval step is keyed without what only training reads: any optimizer, BatchNorm sync or
    # recomputation pass loads it; the model, image size and autocast still count.
    evaluation = lambda c, *parts: compile_cache.step_key(c, "cpu", "eval", *parts, evaluation=True)
    trained_otherwise = configs.supervised.get_config()
    trained_otherwise.optim.update(dict(name="adamw", lr_mults=((r"trunk\..*", 0.1),), clip_grad_norm=1.0))
    trained_otherwise.update(dict(sync_bn=False, compile_remat="off"))
    assert evaluation(trained_otherwise) == evaluation(base) != compile_cache.step_key(base, "cpu", "eval")
    deeper = configs.supervised.get_config()
    deeper.model.trunk.depth = 50
    assert evaluation(deeper) != evaluation(base) != evaluation(base, torch.bfloat16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    # Another CPU (a cache shared by a cluster's nodes): its vendor or its vector instructions.
    monkeypatch.setattr(layers, "cpu_vendor", lambda: "AnotherVendor")
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    family = layers.cpu_family()
    monkeypatch.setattr(layers, "cpu_family", lambda: family + 1)  # AMD Zen 4 and 5 take other passes
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    avx512 = layers.cpu_has_avx512()  # Zen 3 and Zen 4 (one family) take other conv routes, at any ATen capability
    monkeypatch.setattr(layers, "cpu_has_avx512", lambda: not avx512)
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    narrower = "DEFAULT" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "AVX2"  # narrower than this CPU
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: narrower)
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    amx = torch.cpu._is_amx_tile_supported()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: not amx)  # AVX-512 with or without AMX
    assert compile_cache.step_key(base, "cpu", "train") != key
    monkeypatch.undo()
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "another fpipe")
    assert compile_cache.step_key(base, "cpu", "train") != key


def test_a_step_built_under_another_autocast_never_loads_this_one(monkeypatch, tmp_path):
    """The loop derives the autocast dtype from config.precision, but build_train_step and
    build_eval_step take it as an argument: a caller passing bf16 with a float32 config (the
    benchmarks do) must get its own saved step, not the float32 one (nor the reverse)."""
    keys = {}

    def record(fn, args, directory, key, name, fallback, inductor=None):  # runs the step eagerly: no compile
        keys.setdefault(name, []).append(key)
        return fn

    monkeypatch.setattr(compile_cache, "saved_or_compiled", record)
    c = configs.supervised.get_config()
    c.compile_cache_dir = str(tmp_path)
    _, ts, opt = tiny_step()
    model = tiny_model()
    dist = distributed.Dist(device=torch.device("cpu"))
    for autocast in (None, torch.bfloat16, None):
        train = loop.build_train_step(c, model, opt, ts["trainable"], ts["model_state"], frozenset(), dist,
                                      compiling=True, autocast=autocast)
        state = tree.map_leaves(lambda t: t.clone(), ts)
        train(state, batch(), opt.inputs(0.1))
        evaluate = loop.build_eval_step(c, model, dist, compiling=True, autocast=autocast)
        evaluate(tree.merge(ts["trainable"], ts["frozen"]), ts["model_state"], batch())
    for name in ("train step", "eval step"):
        fp32, bf16, fp32_again = keys[name]
        assert fp32 == fp32_again and bf16 != fp32, name
    assert keys["train step"][0] != keys["eval step"][0]


@pytest.mark.parametrize("row_sums_here", [False, True])
def test_the_train_step_compiles_with_the_configs_remat_mode_and_row_sums_where_they_run(monkeypatch, tmp_path,
                                                                                        row_sums_here):
    monkeypatch.setattr(row_sums, "ON_THIS_CPU", row_sums_here)
    given = []
    monkeypatch.setattr(compile_cache, "saved_or_compiled",  # runs the step eagerly: no compile
                        lambda fn, *a, fallback, inductor=None: given.append(inductor) or fn)
    c = configs.supervised.get_config()
    c.compile_cache_dir = str(tmp_path)
    _, ts, opt = tiny_step()
    dist = distributed.Dist(device=torch.device("cpu"))
    assert c.compile_remat == "fused"
    for mode in ("fused", "all", "off"):
        c.compile_remat = mode
        train = loop.build_train_step(c, tiny_model(), opt, ts["trainable"], ts["model_state"], frozenset(), dist,
                                      compiling=True)
        train(tree.map_leaves(lambda t: t.clone(), ts), batch(), opt.inputs(0.1))
    pre = [given_now.pop("post_grad_custom_pre_pass", None) if given_now else None for given_now in given]
    assert given == [{"post_grad_custom_post_pass": remat.MODES["fused"]},
                     {"post_grad_custom_post_pass": remat.MODES["all"]}, {} if row_sums_here else None]
    assert all(isinstance(p, row_sums.RowSums) for p in pre) if row_sums_here else pre == [None] * 3
    assert not remat.MODES["fused"].written and remat.MODES["all"].written


def test_the_loop_keeps_steps_where_the_config_says_keyed_by_the_processes(monkeypatch, tmp_path):
    c = configs.supervised.get_config()
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path))
    assert loop.step_cache(c, distributed.Dist(), "train")[0] == str(tmp_path)  # "auto"
    keys = {loop.step_cache(c, distributed.Dist(**d), "train")[1]
            for d in ({}, {"world_size": 2, "group_name": "0"}, {"world_size": 4, "group_name": "0"},
                      {"world_size": 2, "group_name": "1"})}
    assert len(keys) == 4  # a step's collectives name their group and divide by the world size
    c.compile_cache_dir = str(tmp_path / "mine")
    assert loop.step_cache(c, distributed.Dist(), "train")[0] == str(tmp_path / "mine")
    c.compile_cache_dir = ""
    assert loop.step_cache(c, distributed.Dist(), "train") is None
    monkeypatch.setenv(compile_cache.CACHE_ENV, "")
    c.compile_cache_dir = "auto"
    assert loop.step_cache(c, distributed.Dist(), "train") is None


def test_the_loop_keys_a_kept_frozen_trunk_by_the_trunk_alone(monkeypatch, tmp_path):
    import configs.linear_eval
    monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path))
    c = configs.linear_eval.get_config()
    directory, key = loop.trunk_cache(c, distributed.Dist())
    assert directory == str(tmp_path)
    c.optim.name, c.optim.lr, c.model.heads.res4.pool = "adamw", 1e-3, (1, 1)  # other heads and optimizer
    assert loop.trunk_cache(c, distributed.Dist())[1] == key
    c.model.trunk.name = "resnet50"
    assert loop.trunk_cache(c, distributed.Dist())[1] != key
    assert loop.trunk_cache(c, distributed.Dist(world_size=2)) == loop.trunk_cache(c, distributed.Dist())
    c.compile_cache_dir = ""
    assert loop.trunk_cache(c, distributed.Dist()) is None


ISA_SCRIPT = """
import torch
from fpipe.train import step
x = torch.randn(37, 1003, generator=torch.Generator().manual_seed(0))
f = lambda x: torch.softmax(x * 2 + 1, dim=1).sum(0) + x.relu().mean(1).sum()
print(float((step.maybe_compile(f, True)(x) - f(x)).abs().max()))
"""


def test_inductors_cache_never_hands_kernels_of_other_vector_instructions(tmp_path):
    """One inductor cache directory used with this CPU's vector instructions, then with narrower
    ones (ATEN_CPU_CAPABILITY, as on an older machine sharing the directory): inductor's key does
    not tell them apart, and its 16-float kernels built for 8 gave values of 1e38 (AVX2 after
    AVX-512) or did not compile (no vectors after AVX2); fpipe keys its compiles by them."""
    narrower = {"AVX512": "avx2", "AVX2": "default"}.get(torch.backends.cpu.get_cpu_capability())
    if narrower is None:
        pytest.skip("an x86 CPU with AVX2 or AVX-512 (and its narrower capability) is needed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONPATH=root,
               FPIPE_STRICT_COMPILE="1", OMP_NUM_THREADS="1",
               TORCHINDUCTOR_VEC_ISA_OK="1")  # skips inductor's builds that probe every ISA in a new
    # cache (~15 s); it still picks the one ATEN_CPU_CAPABILITY names, from those the CPU lists
    for capability in ("", narrower):
        out = subprocess.run([sys.executable, "-c", ISA_SCRIPT], cwd=root, capture_output=True, text=True,
                             env={**env, **({"ATEN_CPU_CAPABILITY": capability} if capability else {})}, timeout=300)
        assert out.returncode == 0, (capability, out.stderr[-2000:])
        assert float(out.stdout.split()[-1]) < 1e-4, (capability, out.stdout)


def test_a_step_saved_with_one_optimizers_rules_runs_anothers(tmp_path, caplog):
    """Saved by a run with supervised's SGD (no Nesterov, one lr), loaded by one with finetune's
    (Nesterov, the weight at 10x the lr, no decay on the bias): it must compute the second
    run's update, as its eager step does, not the first's."""
    model, dist = tiny_model(), distributed.Dist(device=torch.device("cpu"))
    runs = {}
    for name, rules in (("supervised", dict(nesterov=False, lr_mults=(), wd_mults=())),
                        ("finetune", dict(nesterov=True, lr_mults=((r"heads\.fc\.weight", 10.0),),
                                          wd_mults=((r".*bias", 0.0),)))):
        c = configs.supervised.get_config()
        c.compile_cache_dir = str(tmp_path)
        c.optim.update(dict(momentum=0.9, weight_decay=1e-2, **rules))
        _, ts, _ = tiny_step()
        opt = optim.build(c.optim, ts["trainable"])
        ts["opt_state"] = opt.init(ts["trainable"])
        outs = {}
        for compiling in (False, True):
            torch._dynamo.reset()
            train = loop.build_train_step(c, model, opt, ts["trainable"], ts["model_state"], frozenset(), dist,
                                          compiling=compiling)
            state = tree.map_leaves(lambda t: t.clone(), ts)
            for i in range(2):  # the second step reads the momentum buffers the first wrote
                with caplog.at_level(logging.INFO):
                    state, _ = train(state, batch(seed=i), opt.inputs(0.1))
            outs[compiling] = state["trainable"]
        runs[name] = outs
    assert "train step loaded and run" in caplog.text  # finetune's run loaded supervised's step
    for name, outs in runs.items():
        assert_same(outs[True], outs[False], exact=False)
    weight = lambda name: runs[name][False]["heads"]["fc"]["weight"]
    assert not torch.allclose(weight("supervised"), weight("finetune"))
