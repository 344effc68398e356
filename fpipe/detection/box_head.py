"""torchvision's RoI box head (TwoMLPHead) and FastRCNNPredictor as one pure init/apply.

Names as torchvision 0.29 under ``roi_heads``: ``box_head.fc6/fc7`` and ``box_predictor.cls_score``
/ ``bbox_pred`` (per-class deltas, class-major: [class 0 dx dy dw dh, class 1 ...]).
"""
import torch

from fpipe.models import layers


def init(seed, in_channels=256 * 7 * 7, representation_size=1024, num_classes=91):
    """``(params, {})``; every layer torch.nn.Linear's default init, as torchvision leaves them."""
    gen = torch.Generator().manual_seed(seed)
    head = {"fc6": layers.linear_init(gen, in_channels, representation_size),
            "fc7": layers.linear_init(gen, representation_size, representation_size)}
    predictor = {"cls_score": layers.linear_init(gen, representation_size, num_classes),
                 "bbox_pred": layers.linear_init(gen, representation_size, num_classes * 4)}
    return {"box_head": head, "box_predictor": predictor}, {}


def init_predictor(seed, in_features=2048, num_classes=91):
    """``{"box_predictor": ...}`` alone (FastRCNNPredictor), for a box head of another kind (C4's res5)."""
    gen = torch.Generator().manual_seed(seed)
    return {"box_predictor": {"cls_score": layers.linear_init(gen, in_features, num_classes),
                              "bbox_pred": layers.linear_init(gen, in_features, num_classes * 4)}}


def apply_predictor(params, x):
    """FastRCNNPredictor on ``[..., F]`` box features: ``(class_logits, box_deltas)``."""
    pred = params["box_predictor"]
    return layers.linear(pred["cls_score"], x), layers.linear(pred["bbox_pred"], x)


def apply(params, state, pooled, *, train=False):
    """``pooled [..., C, PH, PW]`` RoI features -> ``((class_logits, box_deltas), state)``."""
    del train
    head, pred = params["box_head"], params["box_predictor"]
    x = pooled.flatten(-3)
    x = torch.relu(layers.linear(head["fc6"], x))
    x = torch.relu(layers.linear(head["fc7"], x))
    return (layers.linear(pred["cls_score"], x), layers.linear(pred["bbox_pred"], x)), state
