"""fpipe's entry point: ``python main.py --config=configs/linear_eval.py [--config.a.b=v] [--workdir=DIR]``.

    flags -> locked config -> checked (fpipe.train.config_check) -> workdir claimed
    (fpipe.workdir: one config per workdir, one run at a time) -> fpipe.train.loop.run
    (fpipe.evaluate.run for evaluation configs, fpipe.detection.train.run when the config has
    model.detection)

Exit status: 0 done; 1 failed during the run; 2 refused before any work (bad config, a workdir
holding another config's run or in use); 3 training diverged; 128 + signal number when stopped by
SIGTERM (143) or SIGINT (130) after writing a checkpoint. Errors print one line; ``--verbose``
(or FPIPE_DEBUG=1) shows the traceback, which the workdir's ``log`` keeps in any case.
"""
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where logs, checkpoints and results go; default: runs/<config name>, "
                    "plus +<hash> when result-affecting keys are overridden.")
flags.DEFINE_list("allow_change", [], "Config keys allowed to differ from the run already in --workdir "
                  "(e.g. total_epochs to train longer), and 'dataset' to resume although the splits hold "
                  "other images, labels or classes; any other difference is refused.")
flags.DEFINE_bool("config_only", False, "Print the full config (every key, its value and help) and exit.")
flags.DEFINE_bool("verbose", False, "Show tracebacks of errors (also: FPIPE_DEBUG=1).")
FLAGS = flags.FLAGS

# libgomp (torch's OpenMP on Linux) lets an idle thread spin 300,000 times before it sleeps; on a
# machine whose other processes keep the cores busy, those spins take the time the work needs
# (the main job beside two busy processes on 2 cores: 85-213 s, 60-77 s with 20,000; the same on
# a quiet machine, README "Threads"). Set before torch is imported; the user's own value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

EXIT_FAILED, EXIT_REFUSED, EXIT_DIVERGED = 1, 2, 3


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS["config"].value is None:
        print(f"error: no --config given, e.g. python main.py --config=configs/linear_eval.py; shipped: "
              f"{_shipped_configs()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    path = config_flags.get_config_filename(FLAGS["config"])
    config = FLAGS.config
    try:
        config.get("seed")
    except OSError:  # ml_collections raises it on first use of a config file that did not load
        if _debug():
            raise
        print(f"error: {_config_file_message(path)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    if FLAGS.config_only:
        from fpipe import config_help  # torch-free
        print(config_help.describe(config, path))
        return 0
    from fpipe import host_memory, workdir as workdir_lib
    from fpipe.train import config_check, loop  # after flag parsing: importing torch is slow

    memory_note = host_memory.keep_freed_memory()  # each step reuses the last one's memory (glibc)

    file_config = _file_config(path)
    workdir = FLAGS.workdir or workdir_lib.default_workdir(path, config, file_config)
    detection = "detection" in config.get("model", {})  # configs/detection.py: fpipe.detection.train
    if detection:
        from fpipe.detection import train as detection_train
        detection_train.check(config)
    else:
        config_check.check(config)  # every value, before any data, model or file is touched
    main_process = int(os.environ.get("RANK", "0")) == 0
    with workdir_lib.claim(workdir, config, tuple(FLAGS.allow_change), main_process=main_process,
                           file_config=file_config) as changes:
        if main_process:
            _log_to_file(os.path.join(workdir, "log"), f"config {path}:\n{config}")
            logging.info(memory_note)
        overrides = config_flags.get_override_values(FLAGS["config"])
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"config: {path}{f' with {shown}' if shown else ''} (all keys: {workdir}/config.json)\n"
              f"workdir: {workdir}", flush=True)
        run = dict(config_path=path, fingerprint=workdir_lib.fingerprint(config),
                   config_changes={k: list(v) for k, v in changes.items()}, allow_change=list(FLAGS.allow_change))
        if detection:  # Faster / Mask / Keypoint R-CNN: its own data, loss and COCO evaluation
            detection_train.run(config, workdir, run_info=run)
        elif "eval" in config:  # an evaluation run (configs/knn.py & co.): fpipe.evaluate, no training
            from fpipe import evaluate
            evaluate.run(config, workdir, run_info=run)
        else:
            loop.run(config, workdir, run_info=run)
    return 0


def _file_config(path):
    """The config file's own values (no overrides): they name the default workdir, and are the
    values a key added by a newer fpipe takes in an older run's workdir (workdir.check_rerun)."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("fpipe_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


_LOG_FILE = {}


def _log_to_file(path, header):
    """Everything logged also goes to WORKDIR/log (appended: a resumed run continues it)."""
    with open(path, "a") as f:
        f.write(header + "\n")
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.get_absl_logger().addHandler(handler)
    logging.set_stderrthreshold("info")
    _LOG_FILE["path"] = path


def _exit_code(e):
    from fpipe import workdir as workdir_lib
    from fpipe.train import config_check, divergence
    if isinstance(e, (workdir_lib.WorkdirError, config_check.ConfigError)):
        return EXIT_REFUSED
    if isinstance(e, divergence.DivergedError):
        return EXIT_DIVERGED
    return EXIT_FAILED


def _debug():
    return FLAGS.is_parsed() and FLAGS.verbose or os.environ.get("FPIPE_DEBUG") == "1"


def run_main(argv):
    from fpipe.train.signals import Stopped  # torch-free
    try:
        return main(argv)
    except Stopped as e:  # a checkpoint is written; the run is unfinished
        if not e.reported:  # stopped before the loop could say so (setting up, writing frozen.pt): one line
            logging.warning("Stopped by %s: re-run the same command to continue.", e.signal_name)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # SIGINT before the run's handler is installed (importing, checking the config)
        if _debug():
            raise
        print("Stopped by SIGINT before the run started: re-run the same command.", file=sys.stderr, flush=True)
        sys.exit(128 + 2)
    except (app.UsageError, SystemExit):
        raise
    except Exception as e:  # one line for the user; the traceback goes to the log file
        if _debug():
            raise
        if "path" in _LOG_FILE:
            with open(_LOG_FILE["path"], "a") as f:
                f.write(traceback.format_exc())
        where = f"; the traceback is in {_LOG_FILE['path']}" if "path" in _LOG_FILE else ""
        print(f"error: {e}\n(--verbose shows the traceback{where})", file=sys.stderr, flush=True)
        sys.exit(_exit_code(e))


def parse_flags(argv):
    """absl's parsing, with a bad flag or config key reported in one line (exit 2)."""
    try:
        return FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and ml_collections' errors for config keys
        if "--verbose" in argv or os.environ.get("FPIPE_DEBUG") == "1":
            raise
        print(f"error: {_flag_message(e, argv)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)


def _flag_message(e, argv=()):
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: overriding a key that does not exist
        detail = str(e.args[0] if e.args else e).replace("\\'", "'").replace("\\n", "\n").strip("'\"")
        key, _, hint = detail.partition("\n")
        hint = f" {hint.strip()}" if hint.strip() else ""
        config = _config_flag(argv) or "--config=configs/linear_eval.py"
        return (f"no such config key {key.strip(chr(39))!r}.{hint} List every key with --config_only, e.g. "
                f"python main.py {config} --config_only")
    text = str(e)
    missing = re.search(r"earlier failure to load.*?Attempted \[[^\]]*\]:\s*(\S+)", text, re.S)
    if missing:  # overrides given for a config file that did not load
        return _config_file_message(missing.group(1))
    if "Error whilst parsing config file" in text and "Traceback" in text:  # the config's own error, last line
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"{text.split(': Error whilst', 1)[0]}: {last}"
    text = " ".join(text.split())
    return text[:500] if text else type(e).__name__


def _config_flag(argv):
    """The --config flag that absl uses (the last ``--config=F`` or ``--config F``), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            found = arg
        elif arg == "--config" and i + 1 < len(argv):
            found = f"--config={argv[i + 1]}"
    return found


def _config_file_message(path):
    return (f"--config={path}: no such config file, or it failed to import (--verbose shows why); shipped: "
            f"{_shipped_configs()}")


def _shipped_configs():
    names = sorted(name for name in os.listdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))
                   if name.endswith(".py") and name not in ("__init__.py", "common.py"))
    return ", ".join("configs/" + n for n in names)


if __name__ == "__main__":
    app.run(run_main, flags_parser=parse_flags)
