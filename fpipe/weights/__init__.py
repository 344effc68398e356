"""Loading pretrained weights into fpipe models: a pure dict transform with a report.

    from fpipe.weights import load_into, WeightsError
    loaded_flat, report = load_into(target_flat, config.model.weights)

Modules, one concern each: ``io`` (read/write files safely, by content), ``stubs`` (inert
stand-ins for foreign classes), ``numpy_pickle`` (detectron2's ``.pkl``), ``walk`` (bounded
walks over loaded contents), ``transforms`` (select, prefixes, rename, skip), ``renames``
(other libraries' names -> ours), ``detect`` (``format: auto``), ``resample`` (position grids,
layer-scale shapes), ``merge`` (into the model, with checks), ``report``, ``config``
(``model.weights.*``), ``load`` (the pipeline), ``infer`` (which trunk a file holds), ``cli``.
"""
__all__ = ["load_into", "read_checkpoint", "default_config", "WeightsError", "LoadReport"]
_WHERE = {"load_into": "load", "read_checkpoint": "load", "default_config": "config",
          "WeightsError": "errors", "LoadReport": "report"}


def __getattr__(name):
    """Imported on first use, so ``python -m fpipe.weights -h`` never loads torch."""
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"fpipe.weights.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fpipe.weights' has no attribute {name!r}")
