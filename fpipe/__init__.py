"""fpipe: a functional, pure-PyTorch pipeline for evaluating and adapting pretrained vision backbones."""

__version__ = "0.2.0"
