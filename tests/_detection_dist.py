"""One rank of tests/test_detection_distributed.py: main.py as torchrun starts it, with a spy on the
checkpoint saver that records the train state THIS rank holds at each save (every rank calls the
saver; only rank 0 writes the checkpoint) to ``$FPIPE_TEST_SPY_DIR/rank<R>_step<S>.pt``."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from absl import app  # noqa: E402

import main  # noqa: E402
from fpipe import tree  # noqa: E402
from fpipe.train import loop  # noqa: E402


def spying_saver(make_saver, outdir):
    def make(workdir, dist, *args, **kwargs):
        save = make_saver(workdir, dist, *args, **kwargs)

        def spy(step, state, best=None, evaluation_pending=False):
            torch.save({"trainable": tree.flatten(state["trainable"]), "frozen": tree.flatten(state["frozen"]),
                        "model_state": tree.flatten(state["model_state"])},
                       os.path.join(outdir, f"rank{dist.rank}_step{step}.pt"))
            return save(step, state, best, evaluation_pending)
        return spy
    return make


if __name__ == "__main__":
    loop.make_saver = spying_saver(loop.make_saver, os.environ["FPIPE_TEST_SPY_DIR"])
    os.chdir(ROOT)
    sys.argv[0] = "main.py"
    app.run(main.run_main, flags_parser=main.parse_flags)
