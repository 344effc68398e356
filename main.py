"""fpipe's entry point: ``python main.py --config=configs/linear_eval.py [--config.a.b=v] [--workdir=DIR]``.

The config is locked, so an override of a key that does not exist is an error. It is printed
and saved to ``WORKDIR/config.json``; then ``fpipe.train.loop.run`` does the work.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where logs, checkpoints and results go; default: runs/<config name>.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def default_workdir(config_path):
    """``runs/linear_eval`` for ``configs/linear_eval.py`` (``:arg`` variants get a suffix)."""
    path, _, arg = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", name + (f"_{arg.replace('=', '-').replace(',', '_')}" if arg else ""))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fpipe.train import loop  # after flag parsing: importing torch is slow

    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("log", workdir)  # WORKDIR/log.INFO ...
    logging.set_stderrthreshold("info")                            # ... and the console
    logging.info("Config:\n%s", config)
    print(f"workdir: {workdir}\nconfig:\n{config}", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    if "eval" in config:  # an evaluation run (configs/knn.py & co.): fpipe.evaluate, no training
        from fpipe import evaluate
        evaluate.run(config, workdir)
    else:
        loop.run(config, workdir)


if __name__ == "__main__":
    app.run(main)
