"""Detectron-style detection pieces as pure torch functions (docs/DETECTION.md).

boxes (IoU, coding), anchors, matching, sampling, nms, roi_align; torchvision's semantics, no
torchvision import. Variable box counts travel as padded tensors with validity masks.
"""
