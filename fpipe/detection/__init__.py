"""Detectron-style detection pieces as pure torch functions (docs/DETECTION.md).

boxes (IoU, coding), anchors, matching, sampling, nms, roi_align, proposals, roi_targets,
losses; fpn, rpn and box_head as init/apply with torchvision's names. torchvision's semantics,
no torchvision import; variable box counts travel as padded tensors with validity masks.
"""
