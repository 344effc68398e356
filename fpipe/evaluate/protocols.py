"""An evaluation run: features once (or from a cache), then every protocol on every layer.

    config -> processes -> data, model, weights -> fingerprint
           -> features: WORKDIR/features (extracted now, resumable) or eval.features_from (checked)
           -> per layer: knn | linear | logreg | low_shot -> results.json, results.md, results.png
"""
import os
import time

import torch
from absl import logging

from fpipe import data
from fpipe.evaluate import config as eval_config
from fpipe.evaluate import extract, fingerprint, knn, linear, logreg, lowshot, metrics
from fpipe.evaluate import report
from fpipe.models import model as models
from fpipe.train.signals import Stopped


def run(config, workdir, run_info=None):
    """Runs ``config.eval.protocols``; returns ``{protocol: {layer: numbers}}`` (on every rank).
    ``run_info``: provenance from main.py (config path, fingerprint), written to results.json.

    SIGTERM / SIGINT raise ``Stopped`` at once (main.py: exit 143 / 130), as in training: the whole
    run may be cut short, since its one lasting work, a split's feature file, is written whole or
    not at all (a write in progress finishes first, fpipe.files); a re-run extracts only the
    splits that are missing."""
    from fpipe.train import loop  # imported here: the loop imports this package
    return loop.in_processes(_run_until_stopped, config, workdir, run_info)


def _run_until_stopped(config, workdir, dist, stop, run_info):
    with stop.interruptible():
        try:
            return _run(config, workdir, dist, run_info)
        except Stopped as e:
            done = [s for s in extract.SPLITS if os.path.isfile(extract.path_of(workdir, s))]
            logging.warning("Stopped by %s during the evaluation%s: re-run the same command to continue.",
                            e.signal_name, f"; the features of {', '.join(done)} are kept" if done else "")
            e.reported = True
            raise


def _run(config, workdir, dist, run_info):
    from fpipe.train import loop  # load_weights; imported here, the loop imports this package
    ev = config.eval
    eval_config.check(ev)
    os.makedirs(workdir, exist_ok=True)
    torch.manual_seed(config.seed)
    dataset = data.build(config.data)
    model = models.build(config.model, num_classes=dataset.num_classes, image_size=config.data.image_size)
    params, state = model.init(config.seed)
    params, state, run_info["weights"] = loop.initial_weights(params, state, config.model.weights, workdir,
                                                              dist.is_main)
    layers = tuple(ev.layers) or tuple(config.extract.features)
    t0 = time.perf_counter()
    if ev.features_from:
        source = ev.features_from
        fp = fingerprint.of(config, params, state, dataset)
        for split in extract.SPLITS:
            path = extract.path_of(source, split)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"eval.features_from={source!r}: no {path}. Fix: point it at the "
                                        "workdir of an evaluation or extract_features run.")
            extract.is_done(source, split, fp, ())  # raises on another model, weights or data
        logging.info("Reading cached features from %s (the trunk does not run).", source)
    else:
        source = workdir
        fp = extract.run(config, workdir, model, params, state, dataset, dist,
                         lambda b: {k: v.to(dist.device) for k, v in b.items()},
                         compile=loop.should_compile(config, len(dataset.train) + len(dataset.test)),
                         cache=loop.trunk_cache(config, dist))
    extract_s = time.perf_counter() - t0
    train, test = extract.load(source, "train", layers), extract.load(source, "test", layers)
    fit_idx, val_idx = metrics.stratified_split(train.labels, float(ev.val_fraction), int(ev.seed))

    results, seconds = {p: {} for p in ev.protocols}, {p: 0.0 for p in ev.protocols}
    for layer in layers:
        tr_x, te_x = _flat(train.features[layer]), _flat(test.features[layer])
        tr_y, te_y = train.labels, test.labels
        if set(ev.protocols) - {"knn"}:
            fx, vx, tx, ax = _normalized(tr_x[fit_idx], (tr_x[val_idx], te_x, tr_x), ev.normalize)
            fit, val, tst = (fx, tr_y[fit_idx]), (vx, tr_y[val_idx]), (tx, te_y)
        for protocol in ev.protocols:
            start = time.perf_counter()
            if protocol == "knn":
                r = knn.evaluate((tr_x, tr_y), (te_x, te_y), dataset.num_classes, ev.knn, dist)
            elif protocol == "linear":
                r = linear.evaluate(fit, val, tst, dataset.num_classes, ev.linear, dist)
            elif protocol == "logreg":
                r = logreg.evaluate(fit, val, tst, dataset.num_classes, ev.logreg, dist)
            else:  # kNN votes on the raw features, as the knn protocol and dinov2 do; logreg on the normalised
                shot_x, shot_test = (tr_x, te_x) if ev.low_shot.classifier == "knn" else (ax, tx)
                r = lowshot.evaluate((shot_x, tr_y), (shot_test, te_y), dataset.num_classes, ev.low_shot, ev.knn,
                                     ev.logreg)
            results[protocol][layer] = r
            seconds[protocol] += time.perf_counter() - start
            logging.info("%s on %s: %s (%.1f s)", protocol, layer, _summary(r), time.perf_counter() - start)

    provenance = {**run_info, "features_fingerprint": fp, "fingerprint_id": fingerprint.short(fp),
                  "features_from": os.path.abspath(source), "dtype": train.metadata["dtype"],
                  "splits": {"train": len(train.labels), "of which val": len(val_idx), "test": len(test.labels)},
                  "layers": list(layers), "world_size": dist.world_size,
                  "seconds": {"features": round(extract_s, 2), **{p: round(s, 2) for p, s in seconds.items()}}}
    if dist.is_main:
        md = report.write(workdir, results, layers, provenance)
        print(md, flush=True)
    return results


def _flat(x):
    return x.reshape(len(x), -1)


def _normalized(fit_x, others, how):
    """``fit_x`` and ``others`` as float32, scaled by statistics of ``fit_x`` alone."""
    fit_x = fit_x.float()
    others = [o.float() for o in others]
    if how == "standardize":
        mean, std = fit_x.mean(0), fit_x.std(0).clamp_min(1e-6)
        return [(fit_x - mean) / std] + [(o - mean) / std for o in others]
    if how == "l2":
        return [torch.nn.functional.normalize(t, dim=1) for t in [fit_x, *others]]
    return [fit_x, *others]


def _summary(r):
    if "top1" in r:
        return f"top1 {r['top1']:.2f}"
    return ", ".join(f"{k}: {v['top1']:.2f}" for k, v in r.items())
