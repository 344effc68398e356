"""Detection train step: fpipe's compiled step (``compile=True``) vs. its eager step.

    PYTHONPATH=. python benchmarks/detection_step.py                      # configs/detection.py's model
    PYTHONPATH=. python benchmarks/detection_step.py --threads 2 --steps 20

Both programs are ``fpipe.detection.train.make_step`` as the run builds it, on the same batches of
the default generated scenes, from the same initial state, with the same per-step generators:

  eager     the default: ``model.losses`` (its NMS and sampling on the host) under grad_and_value.
  compiled  ``model.train_proposals`` eagerly (a no-grad backbone forward, the RPN's NMS, the
            pooler's scales, the samplers' keys), then the update over ``losses(proposals=...)``
            as one ``torch.compile(fullgraph=True)`` graph.

Each runs ``--steps`` steps from the same state; times are medians after the first call (the
compile is reported apart). Also timed: ``train_proposals`` alone, i.e. what compiling adds
in front of the graph. Output lines:

  ratio_vs_eager: X         eager step time / compiled step time (>1: compiling pays per step)
  compile_s: Y              the compiled step's first call
  proposals_share: Z        train_proposals time / compiled step time
"""
import argparse
import statistics
import time

import torch

from configs import detection as detection_config
from fpipe import freeze, host_memory, optim, tree
from fpipe.detection import collate
from fpipe.detection import model as det_model
from fpipe.detection import train as det_train


def setup(steps):
    config = detection_config.get_config()
    det_cfg = det_train.model_config(config.model.detection)
    data = det_train.build_data(config.data)
    loader = collate.Loader(data.train, config.data.batch_size, train=True, seed=0, rank=0, world_size=1,
                            **det_train.collate_options(config.data, det_cfg, data))
    model = det_model.build(det_cfg, data.num_classes + 1)
    params, model_state = model.init(0)
    trainable, frozen = freeze.partition(params, model.freeze_rules(params))
    opt = optim.build(config.optim, trainable)
    state = {"trainable": trainable, "frozen": frozen, "model_state": model_state, "opt_state": opt.init(trainable)}
    batches = loader.iterate(0)
    return model, opt, state, [next(batches) for _ in range(steps)], config.optim.lr


def run(step, state, batches, hyper):
    """Per-step wall times and the first step's loss."""
    times, losses = [], []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, hyper, torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    return times, losses[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(host_memory.keep_freed_memory())  # as main.py does
    model, opt, state, batches, lr = setup(args.steps)

    eager_times, eager_loss = run(det_train.make_step(model, opt), state, batches, opt.inputs(lr))
    compiled_times, compiled_loss = run(det_train.make_step(model, opt, compiling=True), state, batches,
                                         opt.inputs(lr))
    params = tree.merge(state["trainable"], state["frozen"])
    proposal_times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        model.train_proposals(params, state["model_state"], batch, torch.Generator().manual_seed(i))
        proposal_times.append(time.perf_counter() - t0)

    eager, compiled = statistics.median(eager_times[1:]), statistics.median(compiled_times[1:])
    proposals = statistics.median(proposal_times[1:])
    print(f"threads: {args.threads}, steps: {args.steps} (medians after the first call)")
    print(f"eager_step_s: {eager:.3f}  (first call {eager_times[0]:.1f} s)")
    print(f"compiled_step_s: {compiled:.3f}")
    print(f"train_proposals_s: {proposals:.3f}")
    print(f"first-step loss: eager {eager_loss:.6f}, compiled {compiled_loss:.6f}")
    print(f"ratio_vs_eager: {eager / compiled:.2f}")
    print(f"compile_s: {compiled_times[0]:.1f}")
    print(f"proposals_share: {proposals / compiled:.2f}")


if __name__ == "__main__":
    main()
