"""Loading pretrained weights into fpipe models: a pure dict transform with a report.

    from fpipe.weights import load_into, WeightsError
    loaded_flat, report = load_into(target_flat, config.model.weights)

Modules, one concern each: ``io`` (read/write files safely), ``transforms`` (select, prefixes,
rename, skip), ``detect`` (``format: auto``), ``merge`` (into the model, with checks),
``report``, ``config`` (``model.weights.*``), ``load`` (the pipeline), ``cli``.
"""
from fpipe.weights.config import default_config
from fpipe.weights.errors import WeightsError
from fpipe.weights.load import load_into, read_checkpoint
from fpipe.weights.report import LoadReport

__all__ = ["load_into", "read_checkpoint", "default_config", "WeightsError", "LoadReport"]
