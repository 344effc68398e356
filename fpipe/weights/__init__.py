"""Loading pretrained weights into fpipe models: a pure dict transform with a report.

    from fpipe.weights import load_into, WeightsError
    loaded_flat, report = load_into(target_flat, config.model.weights)

Modules, one concern each: ``folders`` (a weights path: a file or a Hugging Face model folder,
its shards), ``io`` (read/write files safely, by content), ``stubs`` (inert stand-ins for foreign
classes, TorchScript and whole pickled models), ``numpy_pickle`` (detectron2's ``.pkl``),
``flax_layout`` (JAX/Flax ``.npz`` arrays in PyTorch's layouts), ``walk`` (bounded walks over
loaded contents), ``fuse`` (separate q/k/v projections packed), ``transforms`` (select, prefixes,
rename, skip), ``renames`` (other libraries' names -> ours), ``detect`` (``format: auto``),
``resample`` (position grids, layer-scale and leading-1 shapes), ``merge`` (into the model, with
checks), ``report``, ``config`` (``model.weights.*``), ``hf_config`` (what a model folder's
config.json says that tensors cannot), ``load`` (the pipeline), ``infer`` (which trunk a file
holds), ``cli``.
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
