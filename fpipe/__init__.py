"""fpipe: a functional, pure-PyTorch pipeline for evaluating and adapting pretrained vision backbones."""
