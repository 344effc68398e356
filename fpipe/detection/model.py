"""The assembled Faster / Mask / Keypoint R-CNN (torchvision's GeneralizedRCNN) as pure functions.

``build(det_cfg, num_classes) -> DetModel``: ``init(seed) -> (params, state)``,
``losses(params, state, batch, *, generator) -> (total, {name: loss})`` and
``predict(params, state, images, image_sizes) -> [per-image dict]``. Params flatten to
torchvision's detection names: ``backbone.body.*`` (any fpipe trunk; ResNet's names are
torchvision's), ``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.box_head.fc6/fc7``,
``roi_heads.box_predictor.*``, ``roi_heads.mask_head/mask_predictor.*``,
``roi_heads.keypoint_head/keypoint_predictor.*``; a C4 model (``fpn.enabled=False``) has no
``backbone.fpn`` and its res5 as ``roi_heads.box_head.layer4.*``. State is the trunk's norm
statistics under ``backbone.body`` (and C4's res5 under ``roi_heads.box_head``); with frozen
norms (the default, torchvision's FrozenBatchNorm2d) it passes through unchanged.

Images come normalised and padded (fpipe.detection.transform); ``image_sizes`` are each image's
(h, w) before padding. Detections are in that (resized) frame: ``transform.postprocess`` maps
them back to the original images.
"""
import math
import re
from typing import Any, Callable, NamedTuple

import ml_collections
import torch
from torch.utils import _pytree as pytree

from fpipe import tree
from fpipe.detection import anchors as anchors_lib
from fpipe.detection import box_head, fpn, keypoint_head, mask_head, rpn, simple_fpn
from fpipe.detection.boxes import RPN_WEIGHTS, box_iou, encode
from fpipe.detection.losses import fastrcnn_loss, rpn_loss
from fpipe.detection.matching import labels_from_matches, match
from fpipe.detection.postprocess import postprocess_detections
from fpipe.detection.proposals import propose
from fpipe.detection.roi_align import infer_scales, multiscale_roi_align
from fpipe.detection.roi_targets import select_training_samples
from fpipe.detection.sampling import sample
from fpipe.models import resnet
from fpipe.models import trunk as trunk_lib
from fpipe.models.model import build_trunk

# ResNet's stages in the order Detectron's FREEZE_AT counts them (stem = 1, res2 = 2, ...).
RESNET_STAGES = (r"conv1\..*|bn1\..*", r"layer1\..*", r"layer2\..*", r"layer3\..*", r"layer4\..*")


def default_config():
    """``config.model.detection``: torchvision's fasterrcnn_resnet50_fpn defaults. Each key names
    the torchvision argument / Detectron (maskrcnn-benchmark) option it stands for."""
    c = ml_collections.ConfigDict()
    c.backbone = ml_collections.ConfigDict(dict(
        name="resnet50",  # resnet_fpn_backbone(backbone_name=) / MODEL.BACKBONE.CONV_BODY
        options={},  # the trunk's own options (fpipe.models.model.build_trunk)
        features=("res2", "res3", "res4", "res5"),  # returned_layers=[1, 2, 3, 4]
        frozen_norms=True,  # norm_layer=FrozenBatchNorm2d / Detectron's AffineChannel
        freeze_at=2,  # MODEL.BACKBONE.FREEZE_CONV_BODY_AT; torchvision trainable_backbone_layers = 5 - freeze_at
        freeze_conv_body=False,  # MODEL.BACKBONE.FREEZE (all of backbone.body) / trainable_backbone_layers=0
    ))
    c.fpn = ml_collections.ConfigDict(dict(
        enabled=True,  # MODEL.FPN; False: C4 (R-50-C4): RPN and pooler on the one feature, res5 as the box head
        out_channels=256,  # FeaturePyramidNetwork(out_channels=) / MODEL.RESNETS.BACKBONE_OUT_CHANNELS
        simple=False,  # ViTDet's SimpleFeaturePyramid from ONE backbone feature (a ViT's ("patch_grid",)); False: torchvision's FPN
        rpn_levels=None,  # (min, max) FPN levels the RPN sees, e.g. (2, 6) / FPN.RPN_MIN_LEVEL, RPN_MAX_LEVEL; None: all (P2-P6)
        roi_levels=None,  # (min, max) levels the RoI heads pool from, e.g. (2, 5) / FPN.ROI_MIN_LEVEL, ROI_MAX_LEVEL; None: all but the pool level
    ))
    c.rpn = ml_collections.ConfigDict(dict(
        anchor_sizes=((32,), (64,), (128,), (256,), (512,)),  # AnchorGenerator(sizes=) / RPN.ANCHOR_SIZES
        aspect_ratios=((0.5, 1.0, 2.0),) * 5,  # AnchorGenerator(aspect_ratios=) / RPN.ASPECT_RATIOS
        conv_depth=1,  # RPNHead(conv_depth=)
        pre_nms_top_n_train=2000,  # rpn_pre_nms_top_n_train / RPN.PRE_NMS_TOP_N_TRAIN (per level)
        pre_nms_top_n_test=1000,  # rpn_pre_nms_top_n_test / RPN.PRE_NMS_TOP_N_TEST (per level)
        post_nms_top_n_train=2000,  # rpn_post_nms_top_n_train / RPN.POST_NMS_TOP_N_TRAIN (per image)
        post_nms_top_n_test=1000,  # rpn_post_nms_top_n_test / RPN.POST_NMS_TOP_N_TEST
        nms_thresh=0.7,  # rpn_nms_thresh / RPN.NMS_THRESH
        score_thresh=0.0,  # rpn_score_thresh
        min_size=1e-3,  # filter_proposals' min_size / RPN.MIN_SIZE
        fg_iou_thresh=0.7,  # rpn_fg_iou_thresh / RPN.FG_IOU_THRESHOLD
        bg_iou_thresh=0.3,  # rpn_bg_iou_thresh / RPN.BG_IOU_THRESHOLD
        batch_size_per_image=256,  # rpn_batch_size_per_image / RPN.BATCH_SIZE_PER_IMAGE
        positive_fraction=0.5,  # rpn_positive_fraction / RPN.POSITIVE_FRACTION
    ))
    c.rpn_only = False  # MODEL.RPN_ONLY: predict returns the proposals; no RoI heads
    c.box_head = ml_collections.ConfigDict(dict(
        representation_size=1024,  # TwoMLPHead(representation_size=) / ROI_BOX_HEAD.MLP_HEAD_DIM
        pooler_resolution=7,  # MultiScaleRoIAlign(output_size=) / ROI_BOX_HEAD.POOLER_RESOLUTION
        pooler_sampling_ratio=2,  # MultiScaleRoIAlign(sampling_ratio=) / ROI_BOX_HEAD.POOLER_SAMPLING_RATIO
        fg_iou_thresh=0.5,  # box_fg_iou_thresh / ROI_HEADS.FG_IOU_THRESHOLD
        bg_iou_thresh=0.5,  # box_bg_iou_thresh / ROI_HEADS.BG_IOU_THRESHOLD
        batch_size_per_image=512,  # box_batch_size_per_image / ROI_HEADS.BATCH_SIZE_PER_IMAGE
        positive_fraction=0.25,  # box_positive_fraction / ROI_HEADS.POSITIVE_FRACTION
        score_thresh=0.05,  # box_score_thresh / ROI_HEADS.SCORE_THRESH
        nms_thresh=0.5,  # box_nms_thresh / ROI_HEADS.NMS (per class)
        detections_per_img=100,  # box_detections_per_img / ROI_HEADS.DETECTIONS_PER_IMG
    ))
    c.mask_head = ml_collections.ConfigDict(dict(
        enabled=False,  # maskrcnn_resnet50_fpn / MODEL.MASK_ON
        layers=(256, 256, 256, 256),  # MaskRCNNHeads(layers=) / ROI_MASK_HEAD.CONV_LAYERS
        dim_reduced=256,  # MaskRCNNPredictor(dim_reduced=)
        pooler_resolution=14,  # mask_roi_pool output_size / ROI_MASK_HEAD.POOLER_RESOLUTION (28×28 masks)
        pooler_sampling_ratio=2,
        target_max_grid=None,  # fpipe only: bounds the gt masks' adaptive RoIAlign grid (static shapes; None = exact)
    ))
    c.keypoint_head = ml_collections.ConfigDict(dict(
        enabled=False,  # keypointrcnn_resnet50_fpn / MODEL.KEYPOINT_ON
        num_keypoints=17,  # KeypointRCNNPredictor(num_keypoints=) / ROI_KEYPOINT_HEAD.NUM_CLASSES
        layers=(512,) * 8,  # KeypointRCNNHeads(layers=) / ROI_KEYPOINT_HEAD.CONV_LAYERS
        pooler_resolution=14,  # keypoint_roi_pool output_size (56×56 heatmaps)
        pooler_sampling_ratio=2,
    ))
    return c


class DetModel(NamedTuple):
    config: Any
    num_classes: int
    trunk: Any
    init: Callable  # seed -> (params, state)
    losses: Callable  # (params, state, batch, *, generator) -> (total, {name: loss})
    predict: Callable  # (params, state, images, image_sizes) -> [per-image dict]
    freeze_rules: Callable  # params -> tuple of full-match regexes (for fpipe.freeze.partition)
    features: Callable  # (params, state, images, *, train) -> (FPN levels, new state)
    train_proposals: Callable  # (params, state, batch) -> (boxes, valid), nothing recorded (for losses(proposals=))


def build(det_cfg, num_classes) -> DetModel:
    """The model of ``det_cfg`` (:func:`default_config`'s layout) with ``num_classes`` including
    the background (torchvision's num_classes, 91 for COCO).

    ``fpn.enabled=False`` is C4 (Detectron's R-50-C4): a ResNet's res4 (``backbone.features =
    ("res4",)``) feeds the RPN (one level: ``rpn.anchor_sizes = ((32, 64, 128, 256, 512),)``) and
    the RoI pooler (Detectron: ``box_head.pooler_resolution = 14``, sampling ratio 0); the box head
    is the trunk's res5 (``roi_heads.box_head.layer4.*``, not in ``backbone.body``) and a global
    average pool, then the predictor. No mask / keypoint heads on C4 yet."""
    cfg = det_cfg
    c4 = not cfg.fpn.enabled
    b = cfg.backbone
    try:
        trunk = build_trunk(b.name, **dict(b.options))
    except ValueError as e:
        raise ValueError(f"model.detection.backbone (name={b.name!r}, options={dict(b.options)}): {e}; the options "
                         f"belong to the trunk family (the scenes config sets a GroupNorm ResNet's: use a variant "
                         f"such as configs/detection.py:vitdet, or a config file, for another family)") from e
    feature_names = tuple(b.features)
    r, bh, mh, kh = cfg.rpn, cfg.box_head, cfg.mask_head, cfg.keypoint_head
    anchor_sizes = tuple(tuple(s) for s in r.anchor_sizes)
    ratios = tuple(tuple(a) for a in r.aspect_ratios)
    num_anchors = anchors_lib.num_anchors_per_location(anchor_sizes, ratios)
    if len(set(num_anchors)) != 1:
        raise ValueError(f"the RPN head shares one conv over levels: every level needs the same number of "
                         f"anchors, got {num_anchors}")
    if c4:
        if feature_names != ("res4",) or not hasattr(trunk.spec, "block"):
            raise ValueError(f"C4 (fpn.enabled=False) needs a ResNet trunk and backbone.features=('res4',) "
                             f"(res5 becomes the box head); got {b.name!r} with features {feature_names}")
        if len(anchor_sizes) != 1 or len(ratios) != 1:
            raise ValueError(f"C4 has one feature level: rpn.anchor_sizes and rpn.aspect_ratios need one entry "
                             f"each, e.g. ((32, 64, 128, 256, 512),) and ((0.5, 1.0, 2.0),); got {anchor_sizes}")
        if cfg.fpn.get("rpn_levels") is not None or cfg.fpn.get("roi_levels") is not None:
            raise ValueError("fpn.rpn_levels / fpn.roi_levels choose FPN levels; C4 (fpn.enabled=False) has one "
                             "level: leave them None")
        if mh.enabled or kh.enabled:
            raise NotImplementedError("mask / keypoint heads on a C4 model (fpn.enabled=False) are not "
                                      "supported yet; use FPN")

    def trunk_channels():
        side = 256
        feats, state = trunk_lib.meta_features(trunk, feature_names, side)
        norms = sorted({n.rsplit(".", 1)[0] for n in tree.flatten(state) if n.endswith(".running_mean")})
        strides = [side / int(feats[f].shape[-1]) for f in feature_names]
        return [int(feats[f].shape[1]) for f in feature_names], norms, strides

    in_channels, body_norms, strides = trunk_channels()  # body_norms: layers with running statistics
    simple = not c4 and bool(cfg.fpn.get("simple"))
    if simple:
        if len(feature_names) != 1:
            raise ValueError(f"fpn.simple=True (ViTDet's simple feature pyramid) builds every level from one backbone "
                             f"feature, e.g. backbone.features=('patch_grid',) for a ViT; got {feature_names}")
        level_names = tuple(f"simfp_{k}" for k in simple_fpn.levels(strides[0]))
        rpn_idx, roi_idx = fpn_levels(cfg.fpn, level_names, [strides[0] / s for s in simple_fpn.SCALES])
    else:
        rpn_idx, roi_idx = (None, None) if c4 else fpn_levels(cfg.fpn, feature_names, strides)
    if not c4 and not len(anchor_sizes) == len(ratios) == len(rpn_idx):
        raise ValueError(f"the RPN sees {len(rpn_idx)} FPN levels ({len(feature_names)} backbone features + the "
                         f"pool level, fpn.rpn_levels={cfg.fpn.rpn_levels}): rpn.anchor_sizes and rpn.aspect_ratios "
                         f"need {len(rpn_idx)} entries each, got {len(anchor_sizes)} and {len(ratios)}")
    out_ch = in_channels[0] if c4 else cfg.fpn.out_channels  # what the RPN and the pooler see
    res5_norms = [n for n in body_norms if c4 and n.startswith("layer4.")]  # C4: the box head's norms
    body_norms = [n for n in body_norms if n not in res5_norms]
    if c4 and res5_norms and not b.frozen_norms:
        raise NotImplementedError("C4 with backbone.frozen_norms=False (BatchNorms that train, res5's in the box "
                                  "head among them) is not supported yet; keep frozen_norms=True or use GroupNorm")

    def init(seed=0):
        body, body_state = trunk.init(seed)
        if c4:  # res5 leaves the body for the box head (torchvision's IntermediateLayerGetter drops it too)
            body, res5 = {k: v for k, v in body.items() if k != "layer4"}, {"layer4": body["layer4"]}
            res5_state = {"layer4": body_state["layer4"]} if "layer4" in body_state else {}
            body_state = {k: v for k, v in body_state.items() if k != "layer4"}
            params = {"backbone": {"body": body}}
        else:
            neck = (simple_fpn.init(seed + 1, in_channels[0], out_ch, strides[0]) if simple else
                    fpn.init(seed + 1, in_channels, out_ch))[0]
            params = {"backbone": {"body": body, "fpn": neck}}
        params["rpn"] = {"head": rpn.init(seed + 2, out_ch, num_anchors[0], r.conv_depth)[0]}
        state = {"backbone": {"body": body_state}}
        if not cfg.rpn_only and c4:
            res5_channels = trunk.spec.channels("res5")
            params["roi_heads"] = {"box_head": res5, **box_head.init_predictor(seed + 3, res5_channels, num_classes)}
            state["roi_heads"] = {"box_head": res5_state}
        elif not cfg.rpn_only:
            pooled = out_ch * bh.pooler_resolution ** 2
            roi = box_head.init(seed + 3, pooled, bh.representation_size, num_classes)[0]
            if mh.enabled:
                roi.update(mask_head.init(seed + 4, out_ch, tuple(mh.layers), mh.dim_reduced, num_classes)[0])
            if kh.enabled:
                roi.update(keypoint_head.init(seed + 5, out_ch, tuple(kh.layers), kh.num_keypoints)[0])
            params["roi_heads"] = roi
        return params, state

    def box_outputs(params, state, pooled):
        """``(class_logits, box_deltas)`` of pooled RoI features ``[..., C, P, P]``: TwoMLPHead +
        predictor, or (C4) res5 on the RoIs, their mean over space, the predictor."""
        roi = params["roi_heads"]
        if not c4:
            return box_head.apply(roi, {}, pooled)[0]
        lead = pooled.shape[:-3]
        x = pooled.reshape(-1, *pooled.shape[-3:])
        x, _ = resnet.apply_stage(trunk.spec, roi["box_head"], state["roi_heads"]["box_head"], x, 3, train=False)
        return box_head.apply_predictor(roi, x.mean(dim=(2, 3)).reshape(*lead, -1))

    def freeze_rules(params):
        """Regexes of the frozen params: the whole body (freeze_conv_body), else its first
        ``freeze_at`` stages, plus every norm's scale and shift when norms are frozen."""
        del params  # the rules depend on the config only
        if b.freeze_conv_body:
            return (r"backbone\.body\..*",)
        out = []
        if b.freeze_at:
            if not b.name.startswith("resnet") and "depth" not in dict(b.options):
                raise ValueError(f"backbone.freeze_at knows ResNet's stages only; for {b.name!r} freeze by "
                                 f"freeze_conv_body or explicit rules")
            out += [r"backbone\.body\.(" + s + ")" for s in RESNET_STAGES[:b.freeze_at]]
            if c4 and b.freeze_at >= len(RESNET_STAGES):  # res5 is the box head
                out[-1] = r"roi_heads\.box_head\.(" + RESNET_STAGES[-1] + ")"
        if b.frozen_norms and body_norms:  # BatchNorms (with running stats) as FrozenBatchNorm2d
            out.append(r"backbone\.body\.(" + "|".join(re.escape(n) for n in body_norms) + r")\.(weight|bias)")
        if b.frozen_norms and res5_norms and not cfg.rpn_only:  # C4: res5's, in the box head
            out.append(r"roi_heads\.box_head\.(" + "|".join(re.escape(n) for n in res5_norms) + r")\.(weight|bias)")
        return tuple(out)

    def features(params, state, images, *, train=False):
        body_state = state["backbone"]["body"]
        eval_all = b.frozen_norms or not train
        feats, new_body = trunk.apply(params["backbone"]["body"], body_state, images, train=not eval_all,
                                      features=feature_names)
        if c4:
            levels = [feats[feature_names[0]]]
        elif simple:
            levels, _ = simple_fpn.apply(params["backbone"]["fpn"], {}, feats[feature_names[0]])
        else:
            levels, _ = fpn.apply(params["backbone"]["fpn"], {}, [feats[f] for f in feature_names])
        return levels, {**state, "backbone": {**state["backbone"], "body": body_state if eval_all else new_body}}

    def pooled_levels(levels):
        """The levels the RoI poolers read: FPN's ``roi_levels`` (default: all but the max-pool
        level); C4's one."""
        return levels if c4 else [levels[i] for i in roi_idx]

    def rpn_outputs(params, levels, images):
        """RPN head outputs and the anchors of the padded batch (static shapes), over the FPN's
        ``rpn_levels`` (default: all)."""
        levels = levels if c4 else [levels[i] for i in rpn_idx]
        (objectness, deltas), _ = rpn.apply(params["rpn"]["head"], {}, levels)
        grids = [tuple(int(s) for s in f.shape[-2:]) for f in levels]
        anchors = anchors_lib.anchors_for_levels(tuple(images.shape[-2:]), grids, anchor_sizes, ratios,
                                                 dtype=objectness.dtype, device=objectness.device)
        per_level = [h * w * a for (h, w), a in zip(grids, num_anchors)]
        return objectness, deltas, anchors, per_level

    def filter_(objectness, deltas, anchors, per_level, image_shapes, train):
        pre, post = (r.pre_nms_top_n_train, r.post_nms_top_n_train) if train else \
            (r.pre_nms_top_n_test, r.post_nms_top_n_test)
        return propose(objectness, deltas, anchors, image_shapes, per_level, pre, post, r.nms_thresh,
                       r.score_thresh, r.min_size)

    def train_proposals(params, state, batch, generator=None):
        """What :func:`losses` reads from the data, computed outside it, not differentiated: the
        training proposals (``boxes [N, post_nms_top_n_train, 4]``, ``valid``; the NMS is
        data-dependent), the pooler's level ``scales`` (from the batch's largest image) and the
        samplers' uniform keys drawn from ``generator`` in the order ``losses`` draws them (so
        ``losses(proposals=...)`` equals ``losses(generator=...)``). Given these, ``losses`` has no
        host sync and one graph serves every batch of a shape (torch.compile fullgraph).

        It runs with gradient mode on over detached values, so nothing is recorded and every
        layer takes the route it takes inside ``losses``' gradient pass (fpipe.models.layers runs
        some convs differently without gradients): the proposals are those ``losses`` would make."""
        params, state = (pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, t) for t in (params, state))
        with torch.enable_grad():
            images = batch["image"].detach()
            image_shapes = [tuple(int(v) for v in s) for s in batch["image_size"].tolist()]
            levels, _ = features(params, state, images, train=True)
            objectness, deltas, anchors, per_level = rpn_outputs(params, levels, images)
            boxes, _, valid = filter_(objectness, deltas, anchors, per_level, image_shapes, True)
            scales = infer_scales([f.shape[-2:] for f in pooled_levels(levels)], image_shapes)
            n = images.shape[0]
            draw = lambda *shape: torch.rand(shape, generator=generator, device=images.device)  # noqa: E731
            given = {"boxes": boxes, "valid": valid, "scales": torch.tensor(scales, device=images.device),
                     "rpn_keys": draw(n, anchors.shape[0])}
            if not cfg.rpn_only:
                given["roi_keys"] = draw(n, boxes.shape[1] + batch["boxes"].shape[1])
        return given

    def losses(params, state, batch, *, generator=None, proposals=None, return_state=False):
        """``(total, {name: loss})`` (``+ (new_state,)`` with ``return_state``), torchvision's loss
        names. ``proposals``: :func:`train_proposals`' output (then ``generator`` is not used):
        nothing syncs with the host and the function traces as one graph (torch.compile
        fullgraph), if ``mask_head.target_max_grid`` bounds the gt masks' RoIAlign grid."""
        images = batch["image"]
        levels, new_state = features(params, state, images, train=True)
        objectness, deltas, anchors, per_level = rpn_outputs(params, levels, images)
        given = proposals or {}
        if proposals is None:
            image_shapes = [tuple(int(v) for v in s) for s in batch["image_size"].tolist()]
            boxes, _, pvalid = filter_(objectness, deltas, anchors, per_level, image_shapes, True)
        else:
            image_shapes = None  # the pooler's scales are given
            boxes, pvalid = given["boxes"], given["valid"]
        pool = dict(image_shapes=image_shapes, scales=given.get("scales"))
        gt, gvalid = batch["boxes"].to(objectness.dtype), batch["valid"].bool()
        gt_labels = torch.where(gvalid, batch["labels"], 0)
        # RPN: anchors -> match (0.7 / 0.3, low-quality matches kept) -> sample -> loss
        matches = match(box_iou(gt, anchors[None]), r.fg_iou_thresh, r.bg_iou_thresh, True, gvalid)
        labels = labels_from_matches(matches)
        matched = gt.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        anchors_b = anchors[None].expand_as(matched)
        targets = encode(torch.where((labels == 1)[..., None], matched, anchors_b), anchors_b, RPN_WEIGHTS)
        sampled = sample(labels, r.batch_size_per_image, r.positive_fraction, generator, given.get("rpn_keys"))
        out = {}
        out["loss_objectness"], out["loss_rpn_box_reg"] = rpn_loss(objectness, deltas, labels, targets, *sampled)
        if not cfg.rpn_only:
            roi = params["roi_heads"]
            t = select_training_samples(boxes, pvalid, gt, gt_labels, gvalid, bh.batch_size_per_image,
                                        bh.positive_fraction, bh.fg_iou_thresh, bh.bg_iou_thresh, generator,
                                        keys=given.get("roi_keys"))
            pooled = multiscale_roi_align(pooled_levels(levels), t["rois"], output_size=bh.pooler_resolution,
                                          sampling_ratio=bh.pooler_sampling_ratio, **pool)
            cls, reg = box_outputs(params, state, pooled)
            out["loss_classifier"], out["loss_box_reg"] = fastrcnn_loss(cls, reg, t["labels"], t["targets"], t["valid"])
            if mh.enabled or kh.enabled:
                # positives come first among the sampled slots: at most int(B * fraction) of them
                npos = min(int(bh.batch_size_per_image * bh.positive_fraction), t["rois"].shape[1])
                rois, lab = t["rois"][:, :npos], t["labels"][:, :npos]
                positive = t["valid"][:, :npos] & (lab > 0)
                best_gt = torch.where(gvalid[..., None], box_iou(gt, rois), -1.0).argmax(1)  # the matcher's gt
            if mh.enabled:
                pooled = multiscale_roi_align(pooled_levels(levels), rois, output_size=mh.pooler_resolution,
                                              sampling_ratio=mh.pooler_sampling_ratio, **pool)
                logits, _ = mask_head.apply(roi, {}, pooled)
                mt = mask_head.mask_targets(batch["masks"], best_gt, rois, logits.shape[-1], mh.target_max_grid)
                out["loss_mask"] = mask_head.mask_loss(logits, lab, mt, positive)
            if kh.enabled:
                pooled = multiscale_roi_align(pooled_levels(levels), rois, output_size=kh.pooler_resolution,
                                              sampling_ratio=kh.pooler_sampling_ratio, **pool)
                heat, _ = keypoint_head.apply(roi, {}, pooled)
                kp = batch["keypoints"].to(rois.dtype)
                kp = kp.gather(1, best_gt[..., None, None].expand(-1, -1, *kp.shape[-2:]))
                target, ok = keypoint_head.keypoints_to_heatmap(kp, rois, heat.shape[-1])
                out["loss_keypoint"] = keypoint_head.keypoint_loss(heat, target, ok & positive[..., None])
        total = sum(out.values())
        return (total, out, new_state) if return_state else (total, out)

    def predict(params, state, images, image_sizes):
        image_shapes = [tuple(int(v) for v in s) for s in torch.as_tensor(image_sizes).tolist()]
        levels, _ = features(params, state, images, train=False)
        boxes, scores, valid = filter_(*rpn_outputs(params, levels, images), image_shapes, False)
        props = [bx[v] for bx, v in zip(boxes, valid)]
        if cfg.rpn_only:
            return [{"boxes": p, "scores": s[v]} for p, s, v in zip(props, scores, valid)]
        roi = params["roi_heads"]
        pooled = multiscale_roi_align(pooled_levels(levels), props, image_shapes, bh.pooler_resolution,
                                      bh.pooler_sampling_ratio)
        cls, reg = box_outputs(params, state, pooled)
        dboxes, dscores, dlabels = postprocess_detections(cls, reg, props, image_shapes, bh.score_thresh,
                                                          bh.nms_thresh, bh.detections_per_img)
        out = [{"boxes": bx, "scores": s, "labels": lb} for bx, s, lb in zip(dboxes, dscores, dlabels)]
        if mh.enabled:
            pooled = multiscale_roi_align(pooled_levels(levels), dboxes, image_shapes, mh.pooler_resolution,
                                          mh.pooler_sampling_ratio)
            logits, _ = mask_head.apply(roi, {}, pooled)
            probs = logits.sigmoid()
            labels = torch.cat(dlabels)
            probs = probs[torch.arange(labels.shape[0], device=labels.device), labels][:, None]
            for d, m in zip(out, probs.split([len(x) for x in dboxes])):
                d["masks"] = m  # [D, 1, 28, 28]; transform.postprocess pastes them into the image
        if kh.enabled:
            pooled = multiscale_roi_align(pooled_levels(levels), dboxes, image_shapes, kh.pooler_resolution,
                                          kh.pooler_sampling_ratio)
            heat, _ = keypoint_head.apply(roi, {}, pooled)
            for d, h, bx in zip(out, heat.split([len(x) for x in dboxes]), dboxes):
                d["keypoints"], d["keypoint_scores"] = keypoint_head.heatmaps_to_keypoints(h, bx)
        return out

    return DetModel(cfg, num_classes, trunk, init, losses, predict, freeze_rules, features, train_proposals)


def fpn_levels(fpn_cfg, feature_names, strides):
    """``(rpn_indices, roi_indices)`` into the FPN's outputs (one per backbone feature, then the
    pool level) for ``fpn.rpn_levels`` / ``fpn.roi_levels``: (min, max) level numbers as Detectron
    counts them (level k has stride 2^k: res2 -> P2 ... the pool level one past the last)."""
    numbers = []
    for name, stride in zip(feature_names, strides):
        k = math.log2(stride)
        if k != int(k):
            raise ValueError(f"backbone feature {name!r} has stride {stride}, not a power of two: FPN levels "
                             f"are numbered by log2(stride)")
        numbers.append(int(k))
    numbers.append(numbers[-1] + 1)  # the max-pool level

    def pick(key, default):
        span = fpn_cfg.get(key)
        if span is None:
            return default
        if len(span) != 2 or not all(isinstance(v, int) for v in span) or span[0] > span[1]:
            raise ValueError(f"fpn.{key}={span!r}: a (min, max) pair of level numbers, e.g. (2, 5)")
        missing = [k for k in range(span[0], span[1] + 1) if k not in numbers]
        if missing:
            raise ValueError(f"fpn.{key}={tuple(span)}: no FPN level {missing} (levels here: {numbers[0]}-"
                             f"{numbers[-1]}, from backbone.features={tuple(feature_names)} + the pool level)")
        return tuple(numbers.index(k) for k in range(span[0], span[1] + 1))

    return pick("rpn_levels", tuple(range(len(numbers)))), pick("roi_levels", tuple(range(len(numbers) - 1)))
