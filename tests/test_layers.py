"""Pure layers against torch.nn: BatchNorm semantics (momentum, unbiased running var, counter)."""
import pytest
import torch
import torch.nn.functional as F

from fpipe.models import layers


def test_batch_norm_train_matches_torch_batchnorm2d_over_steps():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5)
    ref.weight.data.uniform_(0.5, 1.5)
    ref.bias.data.uniform_(-0.5, 0.5)
    p = {"weight": ref.weight.detach().clone(), "bias": ref.bias.detach().clone()}
    _, s = layers.norm_init("batch", 5)
    for _ in range(4):
        x = torch.randn(8, 5, 3, 3) * 3 + 1
        y, s_new = layers.batch_norm(p, s, x, train=True)
        assert s_new is not s and s["num_batches_tracked"] != s_new["num_batches_tracked"]
        s = s_new
        torch.testing.assert_close(y, ref(x).detach())
    torch.testing.assert_close(s["running_mean"], ref.running_mean)
    torch.testing.assert_close(s["running_var"], ref.running_var)
    assert int(s["num_batches_tracked"]) == int(ref.num_batches_tracked) == 4
    ref.eval()
    x = torch.randn(2, 5, 3, 3)
    y, s_eval = layers.batch_norm(p, s, x, train=False)
    torch.testing.assert_close(y, ref(x).detach())
    assert s_eval is s


def test_batch_norm_does_not_mutate_its_inputs():
    p = {"weight": torch.ones(3), "bias": torch.zeros(3)}
    _, s = layers.norm_init("batch", 3)
    before = {k: v.clone() for k, v in s.items()}
    layers.batch_norm(p, s, torch.randn(4, 3, 2, 2) + 5, train=True)
    assert all(torch.equal(before[k], s[k]) for k in s)


def test_group_and_layer_norm_match_torch():
    x = torch.randn(2, 64, 4, 4)
    p, s = layers.norm_init("group", 64)
    assert s == {}
    torch.testing.assert_close(layers.norm("group", p, s, x, True)[0], torch.nn.GroupNorm(32, 64)(x).detach())
    torch.testing.assert_close(layers.norm("layer", p, s, x, True)[0], torch.nn.GroupNorm(1, 64)(x).detach())


def test_conv_on_a_tiny_input_runs_as_a_matmul_with_conv2d_values_and_gradients(monkeypatch):
    """A "same"-padded conv whose input is at most padding + 1 per side is one dense matmul
    (layers._tiny_input): the values and all gradients of F.conv2d, for strides 1 and 2, with and
    without bias, 2×2, 1×2 and 1×1 inputs, 3×3 and 5×5 kernels; larger inputs keep F.conv2d."""
    torch.manual_seed(0)
    monkeypatch.setattr(layers, "TINY_MATRIX_MIN_ROWS", 0)  # the matrix at any batch, to test it
    calls, as_matmul = [], layers._conv_as_matmul
    monkeypatch.setattr(layers, "_conv_as_matmul", lambda *a: calls.append(1) or as_matmul(*a))
    cases = [(2, 2, 3, 1, 1, True), (2, 2, 3, 1, 2, False), (1, 2, 3, 1, 1, False), (2, 1, 3, 1, 2, True),
             (1, 1, 3, 1, 2, True), (2, 2, 5, 2, 1, False), (3, 3, 5, 2, 2, True)]
    for h, w_, k, pad, stride, bias in cases:
        assert layers._tiny_input((h, w_), (k, k), stride, pad)
        x = torch.randn(4, 6, h, w_, requires_grad=True)
        p = {"weight": torch.randn(10, 6, k, k, requires_grad=True)}
        if bias:
            p["bias"] = torch.randn(10, requires_grad=True)
        y = layers.conv(p, x, stride, pad)
        assert calls.pop() == 1
        ref = torch.nn.functional.conv2d(x, p["weight"], p.get("bias"), stride, pad)
        torch.testing.assert_close(y, ref)
        grad_out = torch.randn_like(ref)
        inputs = [x, *p.values()]
        for g, g_ref in zip(torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
            torch.testing.assert_close(g, g_ref)
    for hw, k, pad, stride in (((3, 3), 3, 1, 1), ((2, 2), 3, 0, 1), ((2, 2), 1, 0, 2), ((4, 4), 7, 3, 1), ((3, 3), 5, 2, 1)):
        assert not layers._tiny_input(hw, (k, k), stride, pad)


def test_a_2x2_map_takes_the_matrix_only_where_the_batch_repays_it(monkeypatch):
    """Under gradients on CPU a 3×3 conv on a 2×2 map builds its matrix each step: only from
    TINY_MATRIX_MIN_ROWS rows (images × output pixels); a smaller batch takes another route with
    F.conv2d's values and gradients. Without gradients (a frozen trunk) and on 1×1 maps, always."""
    torch.manual_seed(0)
    calls, as_matmul = [], layers._conv_as_matmul
    monkeypatch.setattr(layers, "_conv_as_matmul", lambda *a: calls.append(a[2].shape) or as_matmul(*a))
    monkeypatch.setattr(layers, "TINY_MATRIX_MIN_ROWS", 4 * 16)  # batch 16 at 2×2; small tensors
    monkeypatch.setattr(layers, "TINY_MATRIX_RULE_CHANNELS", 16)
    w = torch.randn(24, 16, 3, 3, requires_grad=True)
    for batch, hw, grad, matrix in [(8, 2, True, False), (15, 2, True, False), (16, 2, True, True),
                                    (8, 2, False, True), (8, 1, True, True)]:
        x = torch.randn(batch, 16, hw, hw, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            y = layers.conv({"weight": w}, x, 1, 1)
            ref = torch.nn.functional.conv2d(x, w, None, 1, 1)
        assert (calls.pop() == x.shape if calls else False) == matrix, (batch, hw, grad)
        torch.testing.assert_close(y, ref)
        if grad:
            for g, g_ref in zip(torch.autograd.grad(y.sum(), [x, w]), torch.autograd.grad(ref.sum(), [x, w])):
                torch.testing.assert_close(g, g_ref)
    monkeypatch.setattr(layers, "TINY_MATRIX_RULE_CHANNELS", 17)  # fewer channels: the matrix at any batch
    layers.conv({"weight": w}, torch.randn(8, 16, 2, 2, requires_grad=True), 1, 1)
    assert calls.pop() == (8, 16, 2, 2)


@pytest.mark.parametrize("groups, channels", [(3, 6), (6, 6), (2, 8)])  # grouped, depthwise, and 2 groups
def test_a_grouped_conv_on_a_tiny_input_runs_as_a_batched_matmul_with_conv2d_values_and_gradients(
        groups, channels, monkeypatch):
    """RegNet's and ResNeXt's grouped 3×3 convs, EfficientNet's depthwise ones, on 1×1 maps (the
    last stages at 32 px): one matmul per group, the values and gradients of F.conv2d; on 2×2
    maps they stay convolutions."""
    torch.manual_seed(0)
    calls = []
    as_matmul = layers._conv_as_matmul
    monkeypatch.setattr(layers, "_conv_as_matmul", lambda *a: calls.append(a[-1]) or as_matmul(*a))
    layers.conv({"weight": torch.randn(channels, channels // groups, 3, 3)}, torch.randn(2, channels, 2, 2), 1, 1, groups)
    assert calls == []
    for h, w_, k, pad, stride, bias in [(1, 1, 3, 1, 1, True), (1, 1, 3, 1, 2, False), (1, 1, 5, 2, 1, True)]:
        x = torch.randn(4, channels, h, w_, requires_grad=True)
        p = {"weight": torch.randn(2 * channels, channels // groups, k, k, requires_grad=True)}
        if bias:
            p["bias"] = torch.randn(2 * channels, requires_grad=True)
        y = layers.conv(p, x, stride, pad, groups)
        assert calls.pop() == groups
        ref = torch.nn.functional.conv2d(x, p["weight"], p.get("bias"), stride, pad, 1, groups)
        torch.testing.assert_close(y, ref)
        grad_out = torch.randn_like(ref)
        inputs = [x, *p.values()]
        for g, g_ref in zip(torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
            torch.testing.assert_close(g, g_ref)


def test_conv_on_a_1x1_input_uses_the_centre_tap_exactly():
    """Same values and gradients as F.conv2d; the unused taps' gradients are exact zeros, also under
    bf16 autocast on CPU (where oneDNN leaves them uninitialised)."""
    x = torch.randn(8, 16, 1, 1)
    w = torch.randn(32, 16, 3, 3, requires_grad=True)
    for stride in (1, 2):
        y = layers.conv({"weight": w}, x, stride=stride, padding=1)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, None, stride, 1))
    g, = torch.autograd.grad(layers.conv({"weight": w}, x, stride=2, padding=1).sum(), w)
    g_ref, = torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, 2, 1).sum(), w)
    torch.testing.assert_close(g, g_ref)
    for _ in range(5):
        junk = torch.full((1 << 20,), float("nan"))  # dirty the allocator as a real run would
        del junk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layers.conv({"weight": w}, x, stride=2, padding=1)
        g, = torch.autograd.grad(y.float().sum(), w)
        border = g.clone()
        border[:, :, 1, 1] = 0
        assert torch.isfinite(g).all() and border.abs().max() == 0


def test_dense_as_a_1x1_conv_gives_linears_values_and_gradients(monkeypatch):
    """layers.dense's oneDNN routes (taken where MKL runs AVX2 code): F.linear's values and
    gradients through torch.func, eager and compiled, with the rows as the conv's pixels (as many
    rows as outputs or more) and with the weight's rows as the pixels (fewer), for 2-d, 3-d and
    non-contiguous rows, with and without bias; empty batches, 1-d inputs, bf16 autocast and
    products under DENSE_MIN_MACS take F.linear itself."""
    monkeypatch.setattr(layers, "ROWS_AS_CONV", True)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    inputs = [torch.randn(7, 16), torch.randn(30, 16), torch.randn(3, 5, 16), torch.randn(5, 6, 16).transpose(0, 1)]
    prime = torch.randn(29, 16)  # 29 rows: a 1x29 image

    def loss(params, x, fn):
        return (fn(x, params["w"], params.get("b")) ** 2).sum()

    grad = torch.func.grad_and_value(loss, argnums=(0, 1))

    def grad_here(*args):  # a code object of its own: Dynamo counts recompiles per code object, and
        return grad(*args)  # grad_and_value's wrapper is every test's

    compiled = torch.compile(grad_here, backend="aot_eager", fullgraph=True)  # traced as the train step traces it
    for x in inputs:
        for params in ({"w": w, "b": b}, {"w": w}):
            expected = grad(params, x, torch.nn.functional.linear)
            for got in (grad(params, x, layers.dense), compiled(params, x, layers.dense)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad({"w": w}, prime, layers.dense), grad({"w": w}, prime, torch.nn.functional.linear),
                               rtol=1e-5, atol=1e-5)
    # each route is a 1x1 conv (not F.linear), over the weight's rows or over the rows
    images = []
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: images.append(a[0].shape) or torch.conv2d(*a, **k))
    for x in inputs[:2]:
        layers.dense(x, w, b)
    layers.dense(prime, w, b)
    assert images == [(2, 16, 2, 6), (2, 16, 3, 5), (1, 16, 29, 1)]  # no dim of size 1 where the rows allow
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers.dense(inputs[1], w, b).dtype == torch.bfloat16
    assert layers.dense(torch.randn(0, 16), w).shape == (0, 24)
    torch.testing.assert_close(layers.dense(torch.randn(16).fill_(1.0), w), w.sum(1))
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 30 * 16 * 24 + 1)
    layers.dense(inputs[1], w, b)
    assert len(images) == 3


def _dense_kernels_recorded(monkeypatch):
    """Every product on dense's conv route (forced), and the list that receives each conv's kernel
    (its data pointer)."""
    monkeypatch.setattr(layers, "ROWS_AS_CONV", True)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    kernels = []
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda *a, **k: kernels.append(a[1].data_ptr()) or torch.conv2d(*a, **k))
    return kernels


def test_a_dense_tie_takes_the_weight_as_kernel_only_without_gradients(monkeypatch):
    """As many rows as outputs: without gradients (a frozen trunk, whose weight freezing packs)
    the weight is the conv's kernel; with them, as before, the rows are. F.linear's values both ways."""
    kernels = _dense_kernels_recorded(monkeypatch)
    w, x = torch.randn(24, 16), torch.randn(24, 16)
    with torch.no_grad():
        frozen = layers.dense(x, w)
    training = layers.dense(x, w)
    assert kernels == [w.data_ptr(), x.data_ptr()]
    for y in (frozen, training):
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_constant_weights_make_every_gradient_free_dense_weight_a_kernel(monkeypatch):
    """Within constant_weights (the compiled frozen trunk) a product over fewer rows than outputs
    takes the weight as its conv's kernel without gradients; outside it, or with gradients, the rows."""
    kernels = _dense_kernels_recorded(monkeypatch)
    w, x = torch.randn(24, 16), torch.randn(8, 16)
    ys = []
    with layers.constant_weights():
        with torch.no_grad():
            ys.append(layers.dense(x, w))
        ys.append(layers.dense(x, w))
    with torch.no_grad():
        ys.append(layers.dense(x, w))
    assert kernels == [w.data_ptr(), x.data_ptr(), x.data_ptr()]
    assert not layers._CONSTANT_WEIGHTS
    for y in ys:
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [4, 8, 24])
def test_a_frozen_trunks_grouped_convs_on_2x2_maps_run_as_a_batched_matmul(width, monkeypatch):
    """Within constant_weights and without gradients a grouped 3×3 conv on a 2×2 map of at least 8
    channels a group is one torch.bmm; narrower groups, outside the context or under autocast, oneDNN's conv.
    F.conv2d's values every way."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 3 * width, 2, 2, generator=gen), torch.randn(3 * width, width, 3, 3, generator=gen), \
        torch.randn(3 * width, generator=gen)
    bmms = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmms.append(1) or real(*a))
    want = F.conv2d(x, w, b, 1, 1, 1, 3)
    with torch.no_grad():
        with layers.constant_weights():
            frozen = layers.conv({"weight": w, "bias": b}, x, 1, 1, 3)
        plain = layers.conv({"weight": w, "bias": b}, x, 1, 1, 3)
        with layers.constant_weights(), torch.autocast("cpu", torch.bfloat16):  # measured in float32 only
            layers.conv({"weight": w, "bias": b}, x, 1, 1, 3)
    assert len(bmms) == (width >= layers.GROUPED_MATRIX_MIN_WIDTH)
    for y in (frozen, plain):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_1x1_convs_over_few_images_run_on_onednn_on_one_thread(monkeypatch):
    """On one thread ATen sends a float32 1×1 stride-1 conv over fewer than 16 images to its THNN
    path (MKL's gemm: AVX2 code on AMD, half oneDNN's speed): layers.conv and dense's convs take
    oneDNN there, forward and backward, with F.conv2d's values and gradients."""
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setattr(layers, "ROWS_AS_CONV", True)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    torch.manual_seed(0)
    x, w = torch.randn(8, 16, 5, 5), torch.randn(12, 16, 1, 1)
    rows, w_rows = torch.randn(30, 16), torch.randn(24, 16)  # dense: a (2, 16, 3, 5) image

    def losses(x, w, rows, w_rows):
        return layers.conv({"weight": w}, x).square().sum() + layers.dense(rows, w_rows).square().sum()

    def reference(x, w, rows, w_rows):
        return F.conv2d(x, w).square().sum() + F.linear(rows, w_rows).square().sum()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads = torch.func.grad(losses, argnums=(0, 1, 2, 3))
        expected = torch.func.grad(reference, argnums=(0, 1, 2, 3))(x, w, rows, w_rows)
        for program in (grads, torch.compile(grads)):  # eager, and as inductor compiles the train step
            program(x, w, rows, w_rows)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                got = program(x, w, rows, w_rows)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            names = [e.name for e in prof.events()]
            assert names.count("aten::mkldnn_convolution") == 2, sorted(set(n for n in names if "conv" in n))
            assert not [n for n in names if "slow_conv" in n or "thnn" in n]
    finally:
        torch.set_num_threads(threads)


def test_compiled_dense_convs_take_their_image_as_it_is(monkeypatch):
    """Compiled by inductor (as the train step is), dense's convs get their channels-last image
    without a copy, forward and backward: inductor gives size-1 dims stride 0, and a 1×r image
    then read as NCHW to oneDNN, which copied it on every call (ConvNeXt-T 64 px: ~40 ms a step)."""
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setattr(layers, "ROWS_AS_CONV", True)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    w1, w2 = torch.randn(32, 16), torch.randn(16, 32)
    x = torch.randn(2, 4, 6, 16)  # 48 rows of pixels (more than either's outputs): a (2, 16, 2, 12) image

    def loss(params, x):  # each dense's image computed in the graph, as ConvNeXt's LayerNorm and GELU
        return layers.dense(F.gelu(layers.dense(F.layer_norm(x, (16,)), params["w1"])), params["w2"]).square().sum()

    grads = torch.compile(torch.func.grad(loss))
    expected = torch.func.grad(loss)({"w1": w1, "w2": w2}, x)
    torch.testing.assert_close(grads({"w1": w1, "w2": w2}, x), expected, rtol=1e-4, atol=1e-3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        grads({"w1": w1, "w2": w2}, x)
    convs = [e for e in prof.events() if e.name in ("aten::_convolution", "aten::convolution_backward")]
    copies = [e for e in prof.events() if e.name == "aten::clone" and e.cpu_parent is not None
              and e.cpu_parent.name == "aten::contiguous"]
    assert len(convs) == 4 and not copies, [e.cpu_parent.cpu_parent.name for e in copies]


@pytest.mark.parametrize("rows_as_conv", [True, False])
def test_a_conv_onto_at_most_2x2_pixels_runs_as_dense_with_conv2d_values_and_gradients(rows_as_conv, monkeypatch):
    """On CPU in float32 (dense as oneDNN's conv on AMD, as MKL's matmul elsewhere), a conv whose
    output is at most 2x2 pixels (1x1, 2x2 and 3x3 kernels, stride 1 or 2, padded or not, with and
    without bias), or from 512 input channels 3x3 (4x4 for 1x1 kernels), is a dense over its
    patches: F.conv2d's values and gradients, output channels-last; without gradients, from 256
    input channels 3x3 onto 3x3 too (float32, where dense is MKL's); larger outputs, grouped
    convs and empty batches keep F.conv2d. Under bf16 autocast only where dense is MKL's."""
    monkeypatch.setattr(layers, "ROWS_AS_CONV", rows_as_conv)
    monkeypatch.setattr(layers, "DENSE_MIN_MACS", 0)
    routed = []
    as_matmul = layers._patches_as_matmul
    monkeypatch.setattr(layers, "_patches_as_matmul", lambda *a: routed.append(a[2].shape) or as_matmul(*a))
    torch.manual_seed(0)
    cases = (  # (input h, w), kernel, stride, padding, bias
        ((2, 2), 1, 1, 0, True), ((2, 1), 1, 1, 0, False), ((4, 4), 1, 2, 0, True), ((3, 3), 1, 2, 0, False),
        ((1, 2), 1, 1, 0, True), ((4, 4), 3, 2, 1, True), ((3, 4), 3, 2, 1, False), ((5, 5), 3, 2, 0, True),
        ((4, 4), 2, 2, 0, False), ((4, 3), 3, 1, 0, True))
    for hw, k, stride, padding, bias in cases:
        x = torch.randn(5, 6, *hw).contiguous(memory_format=torch.channels_last).requires_grad_()
        p = {"weight": torch.randn(10, 6, k, k, requires_grad=True)}
        if bias:
            p["bias"] = torch.randn(10, requires_grad=True)
        routed.clear()
        y = layers.conv(p, x, stride, padding)
        ref = torch.nn.functional.conv2d(x, p["weight"], p.get("bias"), stride, padding)
        assert len(routed) == 1 and y.is_contiguous(memory_format=torch.channels_last), (hw, k, stride)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        grad_out = torch.randn_like(ref)
        inputs = [x, *p.values()]
        for g, g_ref in zip(torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # from 512 input channels: onto 3x3 pixels, and 4x4 for a 1x1 conv
    for hw, k, stride, padding, n_routed in (((3, 3), 3, 1, 1, 1), ((6, 6), 3, 2, 1, 1), ((4, 4), 1, 1, 0, 1),
                                             ((8, 8), 1, 2, 0, 1), ((4, 4), 3, 1, 1, 0), ((5, 5), 1, 1, 0, 0)):
        x, p = torch.randn(2, 512, *hw), {"weight": torch.randn(3, 512, k, k)}
        routed.clear()
        y = layers.conv(p, x, stride, padding)
        assert len(routed) == n_routed, (hw, k, stride)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, p["weight"], None, stride, padding),
                                   rtol=1e-4, atol=1e-4)
    routed.clear()
    layers.conv({"weight": torch.randn(12, 511, 3, 3)}, torch.randn(2, 511, 3, 3), padding=1)
    w = {"weight": torch.randn(12, 6, 1, 1)}
    layers.conv(w, torch.randn(2, 6, 3, 3))  # a 3x3 output
    layers.conv(w, torch.randn(2, 6, 2, 2), padding=1)
    layers.conv({"weight": torch.randn(12, 6, 3, 3)}, torch.randn(2, 6, 4, 4), padding=1)  # 4x4
    layers.conv({"weight": torch.randn(12, 3, 1, 1)}, torch.randn(2, 6, 2, 2), groups=2)
    assert layers.conv(w, torch.randn(0, 6, 2, 2)).shape == (0, 12, 2, 2)
    assert routed == []
    # without gradients (a frozen trunk), from 256 input channels a 3x3 conv onto 3x3 pixels too;
    # not in training, not onto 4x4, not from 255 channels, not where dense is a conv (AMD)
    w256 = {"weight": torch.randn(7, 256, 3, 3), "bias": torch.randn(7)}
    x256 = torch.randn(2, 256, 3, 3).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.conv2d(x256, w256["weight"], w256["bias"], 1, 1)
    routed.clear()
    layers.conv(w256, x256, 1, 1)
    with torch.no_grad():
        y = layers.conv(w256, x256, 1, 1)
        assert len(routed) == (0 if rows_as_conv else 1)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        layers.conv(w256, torch.randn(2, 256, 6, 6), 2, 1)  # stride 2 onto 3x3
        assert len(routed) == (0 if rows_as_conv else 2)
        layers.conv(w256, torch.randn(2, 256, 4, 4), 1, 1)
        layers.conv({"weight": torch.randn(7, 255, 3, 3)}, torch.randn(2, 255, 3, 3), 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layers.conv(w256, x256, 1, 1)
        assert len(routed) == (0 if rows_as_conv else 2)
    routed.clear()
    x = torch.randn(2, 6, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # routed where dense is MKL's (measured on Intel)
        y, ref = layers.conv(w, x), torch.nn.functional.conv2d(x, w["weight"])
        assert y.dtype == ref.dtype == torch.bfloat16 and len(routed) == (0 if rows_as_conv else 1)
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("affine", [True, False])
def test_synced_batch_norm_of_one_process_is_batch_norm(affine):
    """The SyncBN path with an identity all-reduce (one process) computes BatchNorm, with or without
    the affine params (MAE's probe BatchNorm has none)."""
    _, s = layers.norm_init("batch", 6)
    p = {"weight": torch.rand(6) + 0.5, "bias": torch.randn(6)} if affine else {}
    x = torch.randn(5, 6)
    want, want_s = layers.batch_norm(p, s, x, True, eps=1e-6)
    got, got_s = layers.batch_norm(p, s, x, True, eps=1e-6, sync_stats=lambda *sums: sums)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_s["running_var"], want_s["running_var"])
