"""Linear evaluation with pooled heads (VISSL's): the pooling in the frozen trunk's graph vs in the heads' step.

    PYTHONPATH=. python benchmarks/pooled_heads.py                  # vissl_imagenet's heads, ResNet-50, 224 px, b16
    PYTHONPATH=. python benchmarks/pooled_heads.py --variant "" --image-size 32 --batch-size 64   # the main job's heads

A config's model and heads (``configs/linear_eval.py`` and a variant), the whole trunk frozen, two
programs built from the loop's own pieces (``loop.build_train_step``, compiled, as a run builds them):

  fpipe         what the loop runs: ``frozen_trunk`` computes each head's pooled input in its
                constant graph (``model.head_inputs``) and the heads' step reads it as it is.
  pool_in_step  the same trunk handing over whole feature maps (``eval_features`` on the features'
                names) and the heads' step pooling them (``model.apply_heads``): fpipe before
                2026-12-06.

Both get the same images and start from the same state; the first losses must agree. Prints the
bytes a batch carries from the trunk to the heads, each program's first call (its compile, in
this process: the second reuses what the first set up), the median step of ``--rounds``
alternated rounds and ``ratio_vs_pool_in_step`` (>1: pooling in the trunk is faster).
"""
import argparse
import statistics
import time

import torch

from benchmarks.linear_eval_step import machine
from configs import linear_eval
from fpipe import freeze, optim, tree
from fpipe.models import model as model_lib
from fpipe.train import distributed
from fpipe.train import frozen_trunk as ft_lib
from fpipe.train import loop as loop_lib


def programs(config, model, params, state, batch_size):
    """``({name: (features, step)}, trainable, frozen, opt)``: the two ways to feed the heads, each
    step compiled as the loop builds it."""
    trainable, frozen = freeze.partition(params, config.model.freeze)
    eval_norms = freeze.eval_norms(state, frozen)
    opt = optim.build(config.optim, trainable)
    dist = distributed.Dist(device=torch.device("cpu"))
    ft = ft_lib.frozen_trunk(model, trainable, frozen, state, eval_norms, batch_size=batch_size)
    # the same constant trunk (every norm folded) giving the features whole, as before 2026-12-06
    whole_maps = ft_lib.eval_features(model, params, state, sorted({h.feature for h in model.heads}),
                                      batch_size=batch_size)
    out = {}
    for name, heads_model, features in (("fpipe", ft.model, ft.features),
                                        ("pool_in_step", model._replace(apply=model.apply_heads), whole_maps)):
        step = loop_lib.build_train_step(config, heads_model, opt, trainable, state, eval_norms, dist,
                                         compiling=True, heads_only=True)
        out[name] = (features, step)
    return out, trainable, frozen, opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vissl_imagenet", help="configs/linear_eval.py's variant ('': the main job's)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps a round")
    args = ap.parse_args(argv)
    config = linear_eval.get_config(args.variant or None)
    with config.unlocked():
        config.compile_cache_dir = ""  # each program compiles here: no kept step from another run
    model = model_lib.build(config.model, num_classes=args.classes, image_size=args.image_size)
    params, state = model.init(0)
    progs, trainable, frozen, opt = programs(config, model, params, state, args.batch_size)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen),
             "label": torch.randint(0, args.classes, (args.batch_size,), generator=gen),
             "index": torch.arange(args.batch_size)}
    print(f"machine: {machine()}\n== {config.model.trunk.name}, heads {', '.join(h.name for h in model.heads)} "
          f"({args.variant or 'the main job'}), {args.image_size} px, batch {args.batch_size}")
    runs, times = {}, {}
    for name, (features, step) in progs.items():
        fresh = lambda t: tree.map_leaves(torch.clone, t)  # each program its own state, the same values
        box = {"ts": {"trainable": fresh(trainable), "frozen": frozen, "model_state": fresh(state),
                      "opt_state": opt.init(trainable)}}
        hyper = opt.inputs(float(config.optim.lr))

        def run(features=features, step=step, box=box, hyper=hyper):
            feats = features(batch["image"])
            box["ts"], metrics = step(box["ts"], {**batch, "image": feats}, hyper)
            return feats, metrics

        t = time.perf_counter()
        feats, metrics = run()
        carried = sum(f.numel() * f.element_size() for f in feats.values())
        print(f"{name:13s} first call {time.perf_counter() - t:6.1f} s, first loss {float(metrics['loss']):.6f}, "
              f"trunk -> heads {carried / args.batch_size / 2**20:.2f} MiB an image")
        runs[name], times[name] = run, []
    for _ in range(args.rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - t) / args.steps)
    step_ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    for name, ms in step_ms.items():
        print(f"{name:13s} {ms:8.1f} ms a step  {args.batch_size / ms * 1e3:7.1f} images/s")
    print(f"ratio_vs_pool_in_step: {step_ms['pool_in_step'] / step_ms['fpipe']:.3f}")


if __name__ == "__main__":
    main()
