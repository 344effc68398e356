"""Cases for tests/test_distributed.py, shared by the test (single-process references) and the
worker processes it starts. Run as a script, this file is one rank of a 2-process gloo run: it
reads torchrun's environment through ``fpipe.train.distributed.init`` and saves what each case
computed to ``OUTDIR/rank<R>.pt``.
"""
import glob
import os
import sys
import time

import ml_collections
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fpipe import defaults, freeze, optim, tree  # noqa: E402
from fpipe.models import fold, layers, model as models  # noqa: E402
from fpipe.train import distributed, loop, step as step_lib  # noqa: E402

CLASSES, SIZE, GLOBAL_BATCH, STEPS, LR = 10, 16, 8, 3, 0.1


def batches(seed, steps=STEPS, n=GLOBAL_BATCH):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(n, 3, SIZE, SIZE, generator=g),
             "label": torch.randint(0, CLASSES, (n,), generator=g)} for _ in range(steps)]


def shard(batch, rank, world):
    per = batch["label"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def sgd_config():
    c = optim.default_config()
    c.lr, c.momentum, c.weight_decay, c.wd_mults = LR, 0.9, 1e-4, []  # decay on every param, as torch SGD
    return c


def build(heads, freeze_rules):
    cfg = ml_collections.ConfigDict(dict(trunk=models.trunk_config(depth=18), heads=heads))
    model = models.build(cfg, num_classes=CLASSES, image_size=SIZE)
    params, state = model.init(0)
    trainable, frozen = freeze.partition(params, freeze_rules)
    return model, trainable, frozen, state


def run_fpipe(heads, freeze_rules, dist=None, sync=False, steps=STEPS):
    """fpipe's step on this rank's shard (the full batch when ``dist`` is None); final train state."""
    model, trainable, frozen, state = build(heads, freeze_rules)
    opt = optim.build(sgd_config(), trainable)
    grad_reduce = distributed.grad_mean(dist) if dist else None
    sync_stats = distributed.sync_stats(dist) if dist and sync else None
    step = step_lib.make_step(model, opt, eval_norms=freeze.eval_norms(state, frozen),
                              grad_reduce=grad_reduce, sync_stats=sync_stats)
    ts = {"trainable": trainable, "frozen": frozen, "model_state": state, "opt_state": opt.init(trainable)}
    for batch in batches(1, steps):
        if dist:
            batch = shard(batch, dist.rank, dist.world_size)
        ts, _ = step(ts, batch, torch.tensor(LR))
    return {"trainable": tree.flatten(ts["trainable"]), "model_state": tree.flatten(ts["model_state"])}


LINEAR = dict(fc=models.head_config("flatten", "linear"))
MLP_BN = dict(mlp=models.head_config("flatten", "mlp", dims=[32, CLASSES], use_bn=True, use_relu=True))


def torch_mlp():
    """torch.nn twin of the MLP_BN head: the same names (0 linear, 1 BatchNorm1d, 2 ReLU, 3 linear)."""
    return torch.nn.Sequential(torch.nn.Linear(512, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                               torch.nn.Linear(32, CLASSES))


def run_ddp(dist):
    """DistributedDataParallel + torch.optim.SGD on the MLP head over the frozen trunk's features."""
    model, trainable, frozen, state = build(MLP_BN, ["trunk"])
    params = tree.merge(trainable, frozen)
    net = torch_mlp()
    net.load_state_dict({**tree.flatten(trainable["heads"]["mlp"]["clf"]),
                         **tree.flatten(state["heads"]["mlp"]["clf"])})
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    for batch in batches(1):
        batch = shard(batch, dist.rank, dist.world_size)
        with torch.no_grad():
            feats = model.features(params, state, batch["image"])["flatten"]
        sgd.zero_grad()
        F.cross_entropy(ddp(feats), batch["label"]).backward()
        sgd.step()
    return {f"heads.mlp.clf.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def run_loop_step(dist=None, steps=2, cache_dir=""):
    """The train step as the loop builds it for a multi-process run, compiled (gradients
    all-reduced and SyncBN's statistics inside the graph, the new state written into the old
    tensors, the backward's recomputation pass) on a tiny RegNet that trains whole; with ``dist``
    None: one process, eager, the global batch (the reference). ``cache_dir``: the step saved
    there by a forked compiler and loaded back, as a run keeps it. (No squeeze-excitation: nothing
    in it is collective, and it made this compile, saved without inductor's caches, 117 s instead
    of 94 on a 2-core Zen 3; tests/test_zoo.py compiles RegNet-Y's gradients.)"""
    import configs.supervised
    c = configs.supervised.get_config()
    c.compile_cache_dir = cache_dir
    c.model.trunk = defaults.trunk("regnet", depth=5, w_0=8, w_a=10.0, w_m=2.0, group_width=8,
                                   bottleneck_multiplier=1.0, se_ratio=0.0, stem_width=8)
    c.model.heads = dict(fc=models.head_config("flatten", "linear"))
    model = models.build(c.model, num_classes=CLASSES, image_size=SIZE)
    params, state = model.init(0)
    opt = optim.build(sgd_config(), params)
    run_on = dist or distributed.Dist(device=torch.device("cpu"))
    step = loop.build_train_step(c, model, opt, params, state, frozenset(), run_on, compiling=dist is not None,
                                 sync_stats=distributed.sync_stats(dist) if dist else None)
    ts = fold.channels_last({"trainable": params, "frozen": {}, "model_state": state, "opt_state": opt.init(params)})
    for batch in batches(2, steps):
        if dist:
            batch = shard(batch, dist.rank, dist.world_size)
        ts, _ = step(ts, batch, opt.inputs(LR))
    return {"trainable": {k: v.clone() for k, v in tree.flatten(ts["trainable"]).items()},
            "model_state": {k: v.clone() for k, v in tree.flatten(ts["model_state"]).items()}}


def layout_grads(rank):
    """Grads in the layouts a step hands over: channels-last conv weights (a 1x1 one too), a
    transposed matrix, vectors, a float64 leaf; values that differ by rank."""
    g = torch.Generator().manual_seed(11 + rank)
    return {"conv": torch.randn(6, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
            "pointwise": torch.randn(8, 6, 1, 1, generator=g).contiguous(memory_format=torch.channels_last),
            "fc": {"weight": torch.randn(5, 8, generator=g).t(), "bias": torch.randn(5, generator=g)},
            "scale": torch.randn(3, generator=g, dtype=torch.float64)}


def grad_mean_layouts(dist):
    """grad_mean over several small buckets (64 bytes each), eager and compiled."""
    reduce = distributed.grad_mean(dist, bucket_bytes=64)
    grads = layout_grads(dist.rank)
    return {"eager": reduce(grads), "compiled": torch.compile(reduce, fullgraph=True)(grads)}


# ---------------------------------------------------------------- SyncBN vs the global batch
BN_SIZES, BN_CHANNELS = (3, 5), 4  # unequal shards: the count weights the statistics


def bn_inputs():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, BN_CHANNELS, 3, 3, generator=g) * 2 + 1 for n in BN_SIZES]
    ws = [torch.randn(n, BN_CHANNELS, 3, 3, generator=g) for n in BN_SIZES]  # loss_r = sum(y_r * w_r)
    p = {"weight": torch.rand(BN_CHANNELS, generator=g) + 0.5, "bias": torch.randn(BN_CHANNELS, generator=g)}
    s = {"running_mean": torch.randn(BN_CHANNELS, generator=g), "running_var": torch.rand(BN_CHANNELS, generator=g) + 1,
         "num_batches_tracked": torch.tensor(3)}
    return xs, ws, p, s


def run_sync_bn(dist, group=None, compiled=False):
    """fpipe's synced batch_norm on this rank's shard, differentiated by torch.func.grad_and_value
    (``compiled``: under torch.compile, as the train step runs it; torch.compile can drop an
    autograd.Function's own backward under torch.func.grad, and SyncBN's all-reduce is one)."""
    xs, ws, p, s = bn_inputs()
    x, w = xs[dist.rank], ws[dist.rank]
    sync = distributed.sync_stats(dist, group)

    def loss(p, x):
        y, new_s = layers.batch_norm(p, s, x, True, sync_stats=sync)
        return (y * w).sum(), (y, new_s)

    grads = torch.func.grad_and_value(loss, argnums=(0, 1), has_aux=True)
    (gp, gx), (_, (y, new_s)) = (torch.compile(grads, fullgraph=True) if compiled else grads)(p, x)
    return {"y": y, "state": new_s, "grad_x": gx, "grad_weight": gp["weight"], "grad_bias": gp["bias"]}


def rank_0_compiles_first(dist, run, done, wait_s=240):
    """``run()`` on both ranks, rank 1 starting once ``done`` (a glob) exists: rank 0 compiles
    alone, and rank 1 then reads what it wrote (the saved step) instead of compiling the same
    graph on the same 2 cores. Rank 1 starts anyway after ``wait_s``: then both compile."""
    deadline = time.monotonic() + wait_s
    while dist.rank == 1 and not glob.glob(done) and time.monotonic() < deadline:
        time.sleep(0.1)
    return run()


def main(outdir):
    dist = distributed.init()
    saved = os.path.join(outdir, "compiled")
    assert dist.world_size == 2 and dist.backend == "gloo", dist
    torch.manual_seed(0)
    out = {
        "dist": {"rank": dist.rank, "world_size": dist.world_size, "local_rank": dist.local_rank,
                 "is_main": dist.is_main, "device": str(dist.device)},
        "grad_mean": distributed.grad_mean(dist)({"a": torch.full((3,), float(dist.rank)),
                                                  "b": {"c": torch.full((2,), 1.0 + dist.rank, dtype=torch.float64)}}),
        "grad_mean_layouts": grad_mean_layouts(dist),
        "metrics": distributed.mean_metrics(dist, {"loss": torch.tensor(2.0 * dist.rank), "h": {"top1": 1.0}}),
        "max": distributed.max_over_ranks(dist, 1.5 + dist.rank),
        "sum": distributed.sum_over_ranks(dist, {"count": torch.tensor(3 + dist.rank), "fc": {"top1": 2}}),
        "linear": run_fpipe(LINEAR, ["trunk"], dist),
        "syncbn_finetune": run_fpipe(LINEAR, [], dist, sync=True, steps=2),
        "loop_step": rank_0_compiles_first(dist, lambda: run_loop_step(dist, cache_dir=saved),
                                           os.path.join(saved, "train-step-*.bin")),
        "saved_files": sorted(os.listdir(saved)),
        "ddp_fpipe": run_fpipe(MLP_BN, ["trunk"], dist),
        "ddp_torch": run_ddp(dist),
        "sync_bn": run_sync_bn(dist),
        "sync_bn_node": run_sync_bn(dist, "node"),
        "sync_bn_compiled": run_sync_bn(dist, compiled=True),
        "sync_bn_alone": distributed.sync_stats(dist, 1) is None,
    }
    torch.save(out, os.path.join(outdir, f"rank{dist.rank}.pt"))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
