"""Data parallelism: 2 gloo processes compute what one process computes on the global batch, what
DistributedDataParallel + torch.optim.SGD compute, and SyncBN's statistics and gradients.

The two ranks run once (tests/_dist_cases.py, started with torchrun's environment variables) and
save their results; each test compares one case with a reference computed here in one process.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

import _dist_cases as cases
from fpipe.train import distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "_dist_cases.py"), str(outdir)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
    if any(p.returncode for p in procs):
        pytest.fail("distributed workers failed:\n" + "\n".join(l[-3000:] for l in logs))
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_trees_close(got, want, atol=1e-5, rtol=1e-4):
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_init_from_environment(ranks):
    for r, out in enumerate(ranks):
        assert out["dist"] == {"rank": r, "world_size": 2, "local_rank": r, "is_main": r == 0, "device": "cpu"}


def test_init_without_environment_is_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    d = distributed.init()
    assert (d.rank, d.world_size, d.is_main, d.enabled) == (0, 1, True, False)
    assert distributed.grad_mean(d) is None and distributed.sync_stats(d) is None
    metrics = {"loss": torch.tensor(1.0)}
    assert distributed.mean_metrics(d, metrics) is metrics and distributed.max_over_ranks(d, 2) == 2.0
    assert distributed.sum_over_ranks(d, metrics) is metrics
    d.shutdown()


def test_collectives(ranks):
    for out in ranks:
        torch.testing.assert_close(out["grad_mean"]["a"], torch.full((3,), 0.5))
        torch.testing.assert_close(out["grad_mean"]["b"]["c"], torch.full((2,), 1.5, dtype=torch.float64))
        torch.testing.assert_close(out["metrics"], {"loss": torch.tensor(1.0), "h": {"top1": torch.tensor(1.0)}})
        assert out["max"] == 2.5
        assert out["sum"] == {"count": 7, "fc": {"top1": 4}}


def test_grad_mean_keeps_each_grads_layout_over_several_buckets(ranks):
    """Each grad comes back the mean over ranks with its own strides (a channels-last grad stays
    channels-last: the fused optimizer would copy it otherwise), eager and compiled."""
    from fpipe import tree
    given = [tree.flatten(cases.layout_grads(r)) for r in range(2)]
    for out in ranks:
        for how in ("eager", "compiled"):
            got = tree.flatten(out["grad_mean_layouts"][how])
            assert list(got) == list(given[0])
            for name, g in got.items():
                torch.testing.assert_close(g, (given[0][name] + given[1][name]) / 2, msg=lambda m: f"{how} {name}: {m}")
                assert g.stride() == given[0][name].stride(), (how, name, g.stride(), given[0][name].stride())


def test_buckets_follow_the_backward_and_split_by_size_and_dtype():
    flat = {"stem": torch.zeros(4), "l1": torch.zeros(8), "l1.half": torch.zeros(2, dtype=torch.float16),
            "l2": torch.zeros(2), "head": torch.zeros(3)}
    assert distributed.buckets(flat, bucket_bytes=16) == [["head", "l2"], ["l1.half"], ["l1"], ["stem"]]
    assert distributed.buckets(flat, bucket_bytes=1 << 20) == [["head", "l2", "l1", "stem"], ["l1.half"]]
    assert distributed.buckets({}, 16) == []


def test_linear_head_equals_one_process_on_the_global_batch(ranks):
    want = cases.run_fpipe(cases.LINEAR, ["trunk"])
    for out in ranks:
        assert_trees_close(out["linear"]["trainable"], want["trainable"])


def test_syncbn_finetune_equals_one_process_on_the_global_batch(ranks):
    """Every BatchNorm trains: with sync_stats they see the global batch, so params AND running
    statistics equal one process's (whose BatchNorms see the whole batch anyway)."""
    want = cases.run_fpipe(cases.LINEAR, [], steps=2)
    for out in ranks:
        assert_trees_close(out["syncbn_finetune"]["trainable"], want["trainable"], atol=1e-4, rtol=1e-3)
        assert_trees_close(out["syncbn_finetune"]["model_state"], want["model_state"], atol=1e-4, rtol=1e-3)


def test_the_loops_compiled_step_saved_and_loaded_equals_one_eager_process_on_the_global_batch(ranks):
    """What a multi-process run compiles (gradients all-reduced and SyncBN inside the graph, the
    state donated, the backward's recomputation), kept for the next run as the default config
    does: rank 0 runs the step its forked compiler saved, rank 1 loads that file as a second run
    would. Against one eager process: params and running statistics. (The same step under a
    plain torch.compile, compile_cache_dir="", differs only in how it is compiled: the collectives
    inside torch.compile are the grad_mean and sync_bn cases.)"""
    want = cases.run_loop_step()
    for out in ranks:
        assert any(f.startswith("train-step-") for f in out["saved_files"]), out["saved_files"]
        assert_trees_close(out["loop_step"]["trainable"], want["trainable"], atol=1e-4, rtol=1e-3)
        assert_trees_close(out["loop_step"]["model_state"], want["model_state"], atol=1e-4, rtol=1e-3)
    assert_trees_close(ranks[0]["loop_step"]["trainable"], ranks[1]["loop_step"]["trainable"], atol=0, rtol=0)


def test_equals_ddp_and_torch_sgd(ranks):
    """A head with BatchNorm1d, unsynced on both sides (each rank's own statistics), as DDP does."""
    for r, out in enumerate(ranks):
        mine = {n[len("heads.mlp.clf."):]: v for n, v in out["ddp_fpipe"]["trainable"].items()}
        theirs = {n[len("heads.mlp.clf."):]: v for n, v in out["ddp_torch"].items()}
        assert_trees_close(mine, {n: theirs[n] for n in mine})
        if r == 0:  # DDP broadcasts rank 0's buffers; rank 0's own running statistics match
            state = {n[len("heads.mlp.clf."):]: v for n, v in out["ddp_fpipe"]["model_state"].items()
                     if n.startswith("heads.")}
            assert_trees_close(state, {n: theirs[n] for n in state})
    # and the two ranks stay identical, as data parallelism requires
    assert_trees_close(ranks[0]["ddp_fpipe"]["trainable"], ranks[1]["ddp_fpipe"]["trainable"], atol=0, rtol=0)


def _reference_bn():
    """torch.nn.BatchNorm2d over the concatenated shards: what nn.SyncBatchNorm computes on 2 ranks
    (it needs CUDA). Loss = sum over ranks of sum(y_r * w_r); weight grads are per rank's loss."""
    xs, ws, p, s = cases.bn_inputs()
    bn = torch.nn.BatchNorm2d(cases.BN_CHANNELS)
    bn.load_state_dict({**p, **s})
    x = torch.cat(xs).requires_grad_()
    y = bn(x)
    ys = torch.split(y, cases.BN_SIZES)
    losses = [(yr * wr).sum() for yr, wr in zip(ys, ws)]
    gx = torch.autograd.grad(sum(losses), x, retain_graph=True)[0]
    per_rank = [torch.autograd.grad(l, [bn.weight, bn.bias], retain_graph=True) for l in losses]
    return ys, torch.split(gx, cases.BN_SIZES), per_rank, bn


@pytest.mark.parametrize("key", ["sync_bn", "sync_bn_node", "sync_bn_compiled"])
def test_sync_bn_equals_batch_norm_over_the_global_batch(ranks, key):
    ys, gxs, per_rank, bn = _reference_bn()
    for r, out in enumerate(ranks):
        got = out[key]
        torch.testing.assert_close(got["y"], ys[r].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["grad_x"], gxs[r], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["grad_weight"], per_rank[r][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["grad_bias"], per_rank[r][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["state"]["running_mean"], bn.running_mean)
        torch.testing.assert_close(got["state"]["running_var"], bn.running_var)
        assert int(got["state"]["num_batches_tracked"]) == int(bn.num_batches_tracked)
    assert ranks[0]["sync_bn_alone"] and ranks[1]["sync_bn_alone"]


_STUCK_RANK = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as tdist
from fpipe.train import distributed
dist = distributed.init(timeout_s=3)
if dist.rank == 1:
    time.sleep(30)   # a stuck rank: never joins the collective
    sys.exit(0)
try:
    tdist.all_reduce(torch.ones(1))
except RuntimeError as e:
    print("EXPLAINED:", distributed.explain_timeout(e, dist, 3))
    os._exit(0)
print("no timeout")
"""


def test_a_stuck_rank_times_out_with_a_message_naming_the_rank(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", _STUCK_RANK, os.path.dirname(HERE)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out, _ = procs[0].communicate(timeout=120)
    procs[1].kill()
    assert "EXPLAINED: rank 0 of 2: a collective did not complete within 3 s" in out, out[-2000:]
