"""Transform pipelines from config strings: ``"random_resized_crop(64)|flip|normalize"``.

:func:`parse` turns a string of registered ops (or a list of op strings) into a
:class:`Pipeline`, called as ``fn(image, generator)``. For the loader a pipeline splits in three:

- leading *geometric* ops (crops, resizes, flips) are planned from the image size alone
  (``transforms.Geometry``), so a JPEG can be decoded at reduced size before a pixel exists;
- trailing *pixelwise* ops (``normalize``, ``to_float``) run once on the whole batch
  (:meth:`Pipeline.finish`), in place, or on the accelerator;
- anything in between runs per sample, in order.
Random draws happen in the order the ops are written, so the split changes no result.
"""
import ast
import inspect
from typing import Callable, Sequence

import torch

from fpipe.data import rand_augment as RA
from fpipe.data import transforms as T


class Geometric:
    """An op that adds steps to a ``Geometry`` from its current size: ``plan(geometry, g)``."""

    def __init__(self, plan: Callable):
        self.plan = plan

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        geometry = T.Geometry(*image.shape[-2:])
        self.plan(geometry, generator)
        return geometry.apply(image)


class Pixelwise:
    """A deterministic op on pixels, the same for one image or a batch; ``inplace`` on float32."""

    def __init__(self, fn: Callable, inplace: Callable):
        self.fn, self.inplace = fn, inplace

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.fn(image)


# ---------------------------------------------------------------------------------------------
# Registered ops: each factory takes the op's arguments from the string and returns an op
# (``Geometric``, ``Pixelwise`` or any ``fn(image, generator) -> image``). A ``size`` left out
# means the pipeline's default size.

OPS: dict = {}


def register(name: str):
    def add(factory):
        OPS[name] = factory
        return factory
    return add


@register("random_resized_crop")
def _random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear"):
    T.check_size(size)
    T.check_scale_ratio(scale, ratio)
    T.check_interpolation(interpolation)

    def plan(geometry, g):
        box = T.random_resized_crop_box(geometry.height, geometry.width, g, tuple(scale),
                                        tuple(ratio))
        geometry.crop(*box)
        geometry.resize(*T.size_hw(size), interpolation)
    return Geometric(plan)


@register("flip")
def _flip(p=0.5):
    if not 0 <= p <= 1:
        raise ValueError(f"p={p!r}: a probability in [0, 1]")
    def plan(geometry, g):
        if T.draw_flip(g, p):
            geometry.flip()
    return Geometric(plan)


@register("resize")
def _resize(size, interpolation="bilinear"):
    T.check_size(size)
    T.check_interpolation(interpolation)

    def plan(geometry, g):
        hw = T.resize_shape(geometry.height, geometry.width, size)
        if hw != (geometry.height, geometry.width):
            geometry.resize(*hw, interpolation)
    return Geometric(plan)


@register("center_crop")
def _center_crop(size):
    T.check_size(size)
    return Geometric(lambda geometry, g: geometry.crop(
        *T.center_crop_box(geometry.height, geometry.width, size)))


@register("rand_augment")
def _rand_augment(magnitude=9, num_layers=2, magnitude_std=0.5, increasing=True, prob=0.5, translate_pct=0.45,
                  fill=(124, 116, 104), interpolation="bicubic"):
    """timm's RandAugment (default: "rand-m9-mstd0.5-inc1", fill = ImageNet's mean): fpipe.data.rand_augment."""
    if interpolation not in RA.RESAMPLE:
        raise ValueError(f"rand_augment interpolation={interpolation!r}; valid: {tuple(RA.RESAMPLE)}")
    options = dict(magnitude=float(magnitude), num_layers=int(num_layers), magnitude_std=float(magnitude_std),
                   increasing=bool(increasing), prob=float(prob), translate_pct=float(translate_pct),
                   fill=tuple(int(v) for v in fill), interpolation=interpolation)

    def op(image, generator):
        return RA.from_pil(RA.augment(RA.to_pil(image), RA.TorchDraws(generator), **options))
    return op


@register("normalize")
def _normalize(mean=T.IMAGENET_MEAN, std=T.IMAGENET_STD):
    return Pixelwise(lambda x: T.normalize(x, mean, std), lambda x: T.normalize_(x, mean, std))


@register("to_float")
def _to_float():
    return Pixelwise(T.to_float, lambda x: x)


class Pipeline:
    """Ops in order; ``pipeline(image, generator)`` applies them all to one image."""

    def __init__(self, ops: list, spec: str, size):
        self.spec, self.size = spec, size
        lead = next((i for i, op in enumerate(ops) if not isinstance(op, Geometric)), len(ops))
        tail = lead
        for i in range(len(ops), lead, -1):
            if not isinstance(ops[i - 1], Pixelwise):
                tail = i
                break
        self.geometric, self.per_sample, self.pixelwise = ops[:lead], ops[lead:tail], ops[tail:]

    def plan(self, height: int, width: int, generator: torch.Generator) -> T.Geometry:
        """The leading geometric ops' steps for a ``height``×``width`` image."""
        geometry = T.Geometry(height, width)
        for op in self.geometric:
            op.plan(geometry, generator)
        return geometry

    def middle(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The per-sample ops after the geometric ones (usually none)."""
        for op in self.per_sample:
            image = op(image, generator)
        return image

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """Float32 in [0, 1] (uint8 / 255), then the trailing pixelwise ops, in place."""
        batch = T.to_float(batch)
        for op in self.pixelwise:
            batch = op.inplace(batch)
        return batch

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = self.middle(self.plan(*image.shape[-2:], generator).apply(image), generator)
        for op in self.pixelwise:
            image = op.fn(image)
        return image

    def __reduce__(self):  # workers started by spawn rebuild it from its string
        return parse, (self.spec, self.size)


def _parse_op(text: str, size):
    """One op string, ``name`` or ``name(args, key=value)``, with literal arguments."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, [], {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        else:
            raise ValueError("not a name or a call")
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"cannot parse transform op {text!r} ({e}); write name or "
                         "name(literal args), e.g. 'random_resized_crop(64, scale=(0.35, 1))'")
    if name not in OPS:
        raise ValueError(f"unknown transform op {name!r} in {text!r}; valid ops: "
                         f"{', '.join(sorted(OPS))}")
    factory = OPS[name]
    signature = inspect.signature(factory)
    try:
        bound = signature.bind_partial(*args, **kwargs)
        if "size" in signature.parameters and "size" not in bound.arguments:
            if size is None:
                raise TypeError("it needs a size and the pipeline has no default size")
            bound.arguments["size"] = size
        signature.bind(*bound.args, **bound.kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for transform op {text!r}: {e}; "
                         f"signature: {name}{str(signature).split(' ->')[0]}") from None
    try:
        return factory(*bound.args, **bound.kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"transform op {text.strip()!r}: {e}") from None


def parse(spec, size=None) -> Pipeline:
    """``"op|op(args)|..."`` or a list of op strings -> a :class:`Pipeline`.

    An empty spec is the identity. ``size`` fills in crop/resize ops written without one, so
    ``"random_resized_crop|normalize"`` follows ``data.image_size``.
    """
    if spec is None:
        texts = []
    elif isinstance(spec, str):
        texts = [t for t in spec.split("|") if t.strip()]
    elif isinstance(spec, Sequence):
        texts = list(spec)
    else:
        raise TypeError(f"transforms: want a '|'-joined string or a list, got {spec!r}")
    names = [t.split("(")[0].strip() for t in texts]
    if "rand_augment" in names and "normalize" in names[:names.index("rand_augment")]:
        raise ValueError(f"transforms {spec!r}: rand_augment works on pixels in [0, 1] (8-bit images); place it "
                         "before normalize")
    return Pipeline([_parse_op(t, size) for t in texts], "|".join(t.strip() for t in texts), size)
