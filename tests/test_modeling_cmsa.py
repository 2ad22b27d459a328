import copy
import itertools
import json
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import randomise_batch_norms, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from cmsa_hf import CMSAConfig, CMSAForHeadPoseEstimation, CMSAForImageClassification, CMSAForKeypointDetection, CMSAModel
from cmsa_hf.codecs import flip_heatmaps_back, mirror_angles
from cmsa_hf.configuration_cmsa import HEAD_FIELDS, TASK_HEADS
from cmsa_hf.modeling_cmsa import (
    CMSABinnedAngleHead,
    CMSABlock,
    CMSAConvBN,
    CMSAEmbedding,
    CMSAHead,
    CMSAReparamConv,
    CMSAUpsample,
    CMSAWindowAttention,
    ChunkedWindowAttention,
    GELULinear,
    dense_gradient,
    no_weight_decay_names,
    reparameterize_model,
    spatial_mean,
)


VARIANT_NAMES = ["cmsa-s", "cmsa-b", "cmsa-l"]


def _eval_pair(config):
    torch.manual_seed(0)
    return CMSAForImageClassification(config).eval()


# --------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name, paper_millions", [("cmsa-s", 4.2), ("cmsa-b", 5.7), ("cmsa-l", 7.4)])
def test_classifier_parameters_match_table_4(name, paper_millions):
    config = CMSAConfig.from_variant(name, image_size=(32, 32), num_labels=100)
    count = CMSAForImageClassification(config).num_parameters() / 1e6
    assert abs(count / paper_millions - 1) <= 0.03, count


@pytest.mark.parametrize("name, paper_millions", [("cmsa-s", 4.0), ("cmsa-b", 5.4), ("cmsa-l", 7.1)])
def test_backbone_parameters_match_table_3(name, paper_millions):
    count = CMSAModel(CMSAConfig.from_variant(name, image_size=(32, 24))).num_parameters() / 1e6
    assert abs(count / paper_millions - 1) <= 0.03, count


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("image_size", [(16, 16), (32, 24), (32, 32), (64, 48), (64, 64)])
def test_one_preset_runs_at_every_resolution(image_size):
    config = CMSAConfig.from_variant("cmsa-s", image_size=image_size)
    model = CMSAModel(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *image_size), output_hidden_states=True)
    height, width = image_size
    assert out.last_hidden_state.shape == (1, 96 + 160 + 224, height, width)
    assert out.pooler_output.shape == (1, 480)
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (1, 96, height, width),
        (1, 160, height // 2, width // 2),
        (1, 224, height // 4, width // 4),
    ]


def test_return_dict_false_and_hidden_states(tiny):
    model = CMSAModel(tiny).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        as_dict = model(pixels)
        as_tuple = model(pixels, return_dict=False)
        with_hidden = model(pixels, output_hidden_states=True, return_dict=False)
    assert as_dict.hidden_states is None
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert len(with_hidden) == 3 and len(with_hidden[2]) == 3
    torch.testing.assert_close(as_dict.pooler_output, as_dict.last_hidden_state.mean(dim=(2, 3)))

    classifier = CMSAForImageClassification(tiny_config(output_hidden_states=True)).eval()
    with torch.no_grad():
        logits, hidden = classifier(pixels, return_dict=False)
    assert logits.shape == (2, 3) and len(hidden) == 3


def _naive_window_attention(module: CMSAWindowAttention, query, key_value):
    """Reference: explicit loops over samples, windows and heads, bias looked up by (|dy|, |dx|).
    -> context (batch, heads * value_dim, H, W), weights (batch, windows, heads, Nq, Nkv), windows row-major."""
    batch, _, height, width = query.shape
    (wh, ww), (kh, kw) = module.window_size, module.kv_window_size
    kd, vd = module.key_dim, module.value_dim
    out = torch.zeros(batch, module.num_heads * vd, height, width)
    all_weights = torch.zeros(batch, (height // wh) * (width // ww), module.num_heads, wh * ww, kh * kw)
    query_points = list(itertools.product(range(wh), range(ww)))
    key_points = list(itertools.product(range(kh), range(kw)))
    for b, row, col, head in itertools.product(
        range(batch), range(height // wh), range(width // ww), range(module.num_heads)
    ):
        q = query[b, head * kd : (head + 1) * kd, row * wh : (row + 1) * wh, col * ww : (col + 1) * ww]
        kv = key_value[b, head * (kd + vd) : (head + 1) * (kd + vd), row * kh : (row + 1) * kh, col * kw : (col + 1) * kw]
        q, kv = q.reshape(kd, -1).T, kv.reshape(kd + vd, -1).T
        table = {(dy, dx): module.attention_bias[head, dy * ww + dx] for dy in range(wh) for dx in range(ww)}
        bias = torch.stack(
            [torch.stack([table[abs(qy - ky), abs(qx - kx)] for ky, kx in key_points]) for qy, qx in query_points]
        )
        weights = torch.softmax(q @ kv[:, :kd].T / kd**0.5 + bias, dim=-1)
        context = (weights @ kv[:, kd:]).T.reshape(vd, wh, ww)
        out[b, head * vd : (head + 1) * vd, row * wh : (row + 1) * wh, col * ww : (col + 1) * ww] = context
        all_weights[b, row * (width // ww) + col, head] = weights
    return out, all_weights


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("window, ratio", [((8, 6), 2), ((4, 3), 1), ((16, 12), 2)])
def test_window_attention_matches_a_loop_over_windows(implementation, window, ratio, channels_last):
    config = CMSAConfig(attn_implementation=implementation)
    torch.manual_seed(0)
    module = CMSAWindowAttention(config, num_heads=2, window_size=window, pool_ratio=ratio)
    with torch.no_grad():
        module.attention_bias.normal_()
    query = torch.randn(2, 2 * config.key_dim, 16, 12)
    key_value = torch.randn(2, 2 * (config.key_dim + config.value_dim), 16 // ratio, 12 // ratio)
    expected, expected_weights = _naive_window_attention(module, query, key_value)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        inputs = (query.contiguous(memory_format=layout), key_value.contiguous(memory_format=layout))
        output, no_weights = module(*inputs)
        with_weights, weights = module(*inputs, output_attentions=True)
    torch.testing.assert_close(output, expected)
    assert output.is_contiguous(memory_format=layout)  # the layout is kept for the projection that follows
    assert no_weights is None
    torch.testing.assert_close(with_weights, output, rtol=0, atol=0)
    if implementation == "eager":  # the weights in the documented layout (batch, windows, heads, Nq, Nkv)
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None  # SDPA computes none


def test_attention_outputs_one_entry_per_block(tiny):
    # The tiny config: stage 1 has three groups of different windows, stage 2 two, stage 3 two of the same window but
    # different key / value pooling; one block per stage. Every block's entry is then a tuple, one tensor per group.
    torch.manual_seed(0)
    model = CMSAForImageClassification._from_config(tiny, attn_implementation="eager").eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(pixels)
        out = model(pixels, output_attentions=True)
        as_tuple = model(pixels, output_attentions=True, return_dict=False)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    assert plain.attentions is None and len(out.attentions) == sum(tiny.depths) and len(as_tuple) == 2
    for stage, block in enumerate(out.attentions):
        assert isinstance(block, tuple) and len(block) == len(tiny.num_heads[stage])
        (height, width), windows = tiny.stage_resolutions()[stage], tiny.window_sizes(stage)
        for group, weights in enumerate(block):
            (wh, ww), ratio = windows[group], tiny.kv_pool_ratios[stage][group]
            shape = (2, (height // wh) * (width // ww), tiny.num_heads[stage][group], wh * ww, (wh // ratio) * (ww // ratio))
            assert weights.shape == shape
            torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:-1]))


def test_attention_outputs_of_equal_groups_are_one_tensor():
    config = tiny_config(window_splits=[[2, 2, 2], [1, 2], [1, 1]], kv_pool_ratios=[[2, 2, 2], [2, 2], [1, 1]])
    model = CMSAModel._from_config(config, attn_implementation="eager").eval()
    model.config.output_attentions = True  # from the config as well
    with torch.no_grad():
        attentions = model(torch.randn(2, 3, 16, 16)).attentions
    # stage 1: 3 groups of 2x2 windows of 8x8, pooled to 4x4 -> heads concatenated; stage 2: different windows.
    assert attentions[0].shape == (2, 4, 3, 64, 16) and attentions[2].shape == (2, 1, 2, 16, 16)
    assert isinstance(attentions[1], tuple) and [w.shape[1] for w in attentions[1]] == [1, 4]


def test_sdpa_warns_that_it_returns_no_attentions(tiny):
    model = CMSAForImageClassification._from_config(tiny, attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match=r"output_attentions=True needs the eager attention.*sdpa"):
        out = model(torch.randn(2, 3, 16, 16), output_attentions=True)
    assert out.attentions is None
    with pytest.raises(ValueError, match="output_attentions"):  # transformers refuses it in the config
        model.config.output_attentions = True


def test_input_embeddings_are_the_stem(tiny):
    for model in (CMSAModel(tiny), CMSAForImageClassification(tiny)):
        assert model.get_input_embeddings() is model.base_model.stages[0].embedding


def test_channels_last_model_matches_and_trains(tiny):
    torch.manual_seed(0)
    model = CMSAForImageClassification(tiny)
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    model.eval()
    with torch.no_grad():
        expected = model(pixels).logits
        model.to(memory_format=torch.channels_last)
        channels_last = model(pixels.contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(channels_last, expected, rtol=1e-4, atol=1e-5)
    model.train()
    model(pixels.contiguous(memory_format=torch.channels_last), labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dense_gradient_passes_values_and_gradients_through_in_the_maps_layout():
    torch.manual_seed(0)
    leaf = torch.randn(2, 6, 4, 5, requires_grad=True)
    hidden = (leaf * 2).contiguous(memory_format=torch.channels_last)
    seen = []
    hidden.register_hook(seen.append)
    output = dense_gradient(hidden)
    assert torch.equal(output, hidden)
    grad = torch.randn(2, 6, 4, 5)  # NCHW, as a windowing's backward hands it on
    output.backward(grad)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(seen[0], grad)
    with torch.no_grad():
        assert dense_gradient(hidden) is hidden


def test_spatial_mean_is_the_mean_with_a_broadcast_gradient():
    torch.manual_seed(0)
    hidden = (torch.randn(2, 6, 4, 5, requires_grad=True) * 1).contiguous(memory_format=torch.channels_last)
    seen = []
    hidden.register_hook(seen.append)
    pooled = spatial_mean(hidden)
    torch.testing.assert_close(pooled, hidden.mean(dim=(2, 3)))
    grad = torch.randn(2, 6)
    pooled.backward(grad)
    assert seen[0].stride()[2:] == (0, 0)
    torch.testing.assert_close(seen[0], (grad / 20)[:, :, None, None].expand(2, 6, 4, 5))


def _gradient_laid_out_channels_last(grad: torch.Tensor) -> bool:
    """Dense channels-last, or broadcast over positions with channels innermost (`spatial_mean`'s backward)."""
    return grad.is_contiguous(memory_format=torch.channels_last) or (
        grad.stride(2) == grad.stride(3) == 0 and grad.stride(1) == 1
    )


@pytest.mark.parametrize("model_class", [CMSAForImageClassification, CMSAForKeypointDetection, CMSAForHeadPoseEstimation])
def test_channels_last_training_hands_every_conv_and_norm_its_gradient_channels_last(tiny, model_class):
    """On CPU a convolution, BatchNorm or pooling backward whose gradient is laid out otherwise than its input runs
    a slow strided loop: the windowing, concatenations and pooling of a channels-last model must not hand one on."""
    torch.manual_seed(0)
    model = model_class(tiny).train().to(memory_format=torch.channels_last)
    layouts = {}

    def watch(name):
        def hook(module, inputs, output):
            output.register_hook(lambda grad: layouts.__setitem__(name, _gradient_laid_out_channels_last(grad)))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.AvgPool2d)):
            module.register_forward_hook(watch(name))
    pixels = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    outputs = model(pixels)
    output = outputs.logits if model_class is CMSAForImageClassification else outputs[0]
    (output * torch.randn_like(output)).sum().backward()
    assert len(layouts) > 20
    assert [name for name, channels_last in layouts.items() if not channels_last] == []


def test_sdpa_and_eager_models_agree(tiny):
    torch.manual_seed(0)
    model = CMSAForImageClassification(tiny).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model(pixels).logits
        model.config._attn_implementation = "eager"
        eager = model(pixels).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


def test_chunked_window_attention_matches_the_explicit_form_across_chunks(monkeypatch):
    """Values and gradients of q, k, v and the bias, with chunks of 3 windows over 7 (a ragged last chunk)."""
    torch.manual_seed(0)
    query = torch.randn(7, 2, 12, 16, dtype=torch.float64, requires_grad=True)
    key_value = torch.randn(7, 2, 6, 48, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 12, 6, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr("cmsa_hf.modeling_cmsa.ATTENTION_CHUNK_BYTES", 3 * bias.numel() * bias.element_size())
    assert len(ChunkedWindowAttention._chunks(query, bias)) == 3

    def explicit(query, key_value, bias):
        key, value = key_value.split([16, 32], dim=-1)
        return torch.matmul((query @ key.transpose(-2, -1) * 0.25 + bias).softmax(dim=-1), value)

    def chunked(query, key_value, bias):
        return ChunkedWindowAttention.apply(query, *key_value.split([16, 32], dim=-1), bias, 0.25)

    grad_output = torch.randn(7, 2, 12, 32, dtype=torch.float64)
    inputs = (query, key_value, bias)
    expected, result = explicit(*inputs), chunked(*inputs)
    torch.testing.assert_close(result, expected)
    for got, want in zip(torch.autograd.grad(result, inputs, grad_output), torch.autograd.grad(expected, inputs, grad_output)):
        torch.testing.assert_close(got, want)
    small = (query[:2, :, :4], key_value[:2, :, :3], bias[:, :4, :3])
    assert torch.autograd.gradcheck(chunked, tuple(t.detach().clone().requires_grad_() for t in small))


def test_gelu_linear_matches_the_plain_mlp_tail():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    linear = nn.Linear(8, 4).double()
    inputs = (hidden, linear.weight, linear.bias)
    assert torch.autograd.gradcheck(GELULinear.apply, inputs)
    grad_output = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    expected = torch.autograd.grad(linear(torch.nn.functional.gelu(hidden)), inputs, grad_output)
    for got, want in zip(torch.autograd.grad(GELULinear.apply(*inputs), inputs, grad_output), expected):
        torch.testing.assert_close(got, want)


def test_memory_saving_training_path_is_the_same_run():
    """Three SGD steps on CPU (AdamW would blow up rounding noise in gradients that are zero in exact arithmetic,
    such as the key bias's): SDPA (chunked attention that recomputes its probabilities, GELU recomputed in the MLP)
    against the explicit path that saves everything: the same losses and gradients, from fewer saved bytes."""
    config = tiny_config(depths=[2, 2, 1], drop_path_rate=0.2)
    torch.manual_seed(0)
    saving = CMSAForImageClassification._from_config(config, attn_implementation="sdpa").train()
    reference = copy.deepcopy(saving)
    reference.config._attn_implementation = "eager"
    for mlp in reference.modules():
        if hasattr(mlp, "recompute_activation"):
            mlp.recompute_activation = False
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])

    def train(model) -> tuple[list[float], list[dict], int]:
        torch.manual_seed(1)
        optimizer, losses, gradients, saved = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), [], [], {}

        def count(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        for step in range(3):
            with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
                loss = model(pixels, labels=labels).loss
            loss.backward()
            gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, gradients, sum(saved.values())

    reference_losses, reference_gradients, reference_bytes = train(reference)
    saving_losses, saving_gradients, saving_bytes = train(saving)
    assert saving_losses == pytest.approx(reference_losses, rel=1e-5)
    assert len(set(reference_losses)) == 3
    for expected, result in zip(reference_gradients, saving_gradients):
        total = torch.cat([gradient.flatten() for gradient in expected.values()]).norm()
        for name, gradient in expected.items():  # relative, with a floor: some are ~0 in exact arithmetic (BN after)
            assert (result[name] - gradient).norm() <= 1e-4 * max(gradient.norm(), 1e-3 * total), name
    assert saving_bytes < reference_bytes, (saving_bytes, reference_bytes)


def test_activation_checkpointing_is_the_same_run_in_less_memory():
    """Three AdamW steps with stochastic depth: the same losses, weights and BatchNorm statistics (the backward's
    recomputation must not update them a second time), from a fraction of the saved activations."""
    config = tiny_config(depths=[2, 2, 1], drop_path_rate=0.2)
    torch.manual_seed(0)
    reference = CMSAForImageClassification(config).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in checkpointed.modules() if isinstance(block, CMSABlock))
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])

    def train(model) -> tuple[list[float], int]:
        torch.manual_seed(1)  # the stochastic-depth masks
        optimizer, losses, saved_bytes = torch.optim.AdamW(model.parameters(), lr=1e-3), [], 0

        def count(tensor):
            nonlocal saved_bytes
            saved_bytes += tensor.numel() * tensor.element_size()
            return tensor

        for step in range(3):
            with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
                loss = model(pixels, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, saved_bytes

    reference_losses, reference_bytes = train(reference)
    checkpointed_losses, checkpointed_bytes = train(checkpointed)
    assert checkpointed_losses == pytest.approx(reference_losses, rel=1e-6)
    assert len(set(reference_losses)) == 3  # the weights moved
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(checkpointed.state_dict()[name], value, msg=name)  # num_batches_tracked included
    assert checkpointed_bytes < 0.5 * reference_bytes, (checkpointed_bytes, reference_bytes)


def test_initial_gradients_stay_bounded_through_the_blocks():
    """The attention's output projection starts as the authors' nn.Linear (std initializer_range). With the
    convolution init, CMSA-S's first stage received 60-270x the last stage's gradient here (5x with the Linear
    init), and training from scratch stalled at predicting the mean."""
    torch.manual_seed(0)
    config = CMSAConfig.from_variant("cmsa-s", image_size=(32, 32))
    model = CMSAModel(config, add_fusion_layer=False).train()
    projections = [block.attention.proj.weight for stage in model.stages for block in stage.blocks]
    assert all(abs(weight.std().item() - config.initializer_range) < 0.003 for weight in projections)

    stage_outputs = model(torch.randn(32, 3, 32, 32), output_hidden_states=True).hidden_states
    for output in stage_outputs:
        output.retain_grad()
    (stage_outputs[-1] * torch.randn_like(stage_outputs[-1])).sum().backward()
    first, last = (output.grad.norm().item() for output in (stage_outputs[0], stage_outputs[-1]))
    assert first / last < 20, f"the gradient grows {first / last:.0f}x from the last stage back to the first"


# --------------------------------------------------------------------------------------------- classification


def test_classification_loss_and_label_maps():
    config = tiny_config(id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2})
    model = CMSAForImageClassification(config).eval()
    pixels, labels = torch.randn(3, 3, 16, 16), torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(pixels, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model.config.id2label[2] == "owl" and model.config.label2id["dog"] == 1


def test_multi_label_and_regression_problem_types():
    multi = CMSAForImageClassification(tiny_config(problem_type="multi_label_classification")).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    with torch.no_grad():
        out = multi(torch.randn(1, 3, 16, 16), labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))

    regression = CMSAForImageClassification(tiny_config(num_labels=1)).eval()
    with torch.no_grad():
        out = regression(torch.randn(2, 3, 16, 16), labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(), torch.tensor([0.5, -1.0])))


def test_label_outside_num_labels_is_a_clear_error(tiny):
    model = CMSAForImageClassification(tiny).eval()
    with pytest.raises(ValueError, match=r"\[0, 3\).*3"):
        model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 3]))


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 16, 16), r"4D tensor \(batch_size, 3, 16, 16\), got a 3D tensor \(3, 16, 16\)"),
        ((2, 1, 16, 16), r"1 channels but the model expects 3.*got \(2, 1, 16, 16\)"),
        ((2, 4, 16, 16), r"4 channels but the model expects 3"),
        ((2, 3, 32, 24), r"32x24 but the model was built for image_size 16x16.*\(batch_size, 3, 16, 16\)"),
    ],
)
def test_bad_pixel_values(tiny, shape, message):
    model = CMSAForImageClassification(tiny).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (np.zeros((2, 3, 16, 16), np.float32), TypeError, r"pixel_values must be a torch.Tensor .* of dtype torch.float32, got a ndarray"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, r"pixel_values has dtype torch.uint8 but the model's weights are torch.float32"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.int64), TypeError, r"pixel_values has dtype torch.int64 .*torch.float32"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.float16), TypeError, r"pixel_values has dtype torch.float16 .*torch.float32"),
        (torch.zeros(0, 3, 16, 16), ValueError, r"pixel_values is an empty batch \(0, 3, 16, 16\).*batch_size >= 1"),
    ],
    ids=["numpy", "uint8", "int64", "half", "empty"],
)
def test_pixel_values_of_the_wrong_type_dtype_or_batch(tiny, pixel_values, error, message):
    model = CMSAForImageClassification(tiny).eval()
    with pytest.raises(error, match=message):
        model(pixel_values)


def test_a_lower_precision_input_runs_under_autocast(tiny):
    model = CMSAForImageClassification(tiny).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).logits.shape == (2, 3)


def test_a_training_step_under_autocast_follows_the_full_precision_gradient(tiny):
    """bf16 autocast on CPU takes the chunked attention (bf16 inputs) and the plain MLP: every gradient is there,
    finite, and points where the float32 step's does."""
    torch.manual_seed(0)
    model = CMSAForImageClassification(tiny).train()
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])

    def gradient(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(pixels, labels=labels).loss
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters()])

    full, mixed = gradient(False), gradient(True)
    assert torch.isfinite(mixed).all() and mixed.numel() == full.numel()
    assert torch.nn.functional.cosine_similarity(full, mixed, dim=0) > 0.95


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused_in_training_before_batch_norm(tiny, bad_value):
    model = CMSAForImageClassification(tiny).train()
    pixels = torch.randn(3, 3, 16, 16)
    pixels[1, 0, 4, 4] = bad_value
    statistics = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k})
    with pytest.raises(ValueError, match=r"pixel_values holds NaN or inf values \(images \[1\] of the batch\) in training mode"):
        model(pixels, labels=torch.tensor([0, 1, 2]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())  # BatchNorm untouched


def test_non_finite_pixels_in_eval_only_spoil_their_own_image(tiny):
    """As check_pixel_values documents: not checked in eval mode, NaN outputs for that image, the others unchanged."""
    model = randomise_batch_norms(CMSAForImageClassification(tiny)).eval()
    pixels = torch.randn(3, 3, 16, 16)
    spoilt = pixels.clone()
    spoilt[1, 2, 0, 0] = float("nan")
    with torch.no_grad():
        clean, logits = model(pixels).logits, model(spoilt).logits
    assert torch.isnan(logits[1]).all()
    torch.testing.assert_close(logits[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize(
    "labels, error, message",
    [
        ([0, 1], TypeError, r"labels must be a torch.Tensor, got a list"),
        (torch.tensor([[0, 1]]), ValueError, r"labels has shape \(1, 2\) for a batch of 2 images"),
        (torch.tensor([0, 1, 2]), ValueError, r"labels has shape \(3,\) for a batch of 2 images"),
        (torch.tensor([[0], [1]]), ValueError, r"labels must have shape \(2,\).*got \(2, 1\)"),
        (torch.tensor([-100, -100]), ValueError, r"every label of the batch is the ignore index -100"),
        (torch.tensor([0.0, 2.0]), ValueError, r"labels of dtype torch.float32 and shape \(2,\) fit no problem type.*labels.long\(\)"),
        (torch.tensor([0, 2], dtype=torch.uint8), ValueError, r"labels of dtype torch.uint8 .*int64"),
    ],
    ids=["list", "1-by-batch", "batch-size", "batch-by-1", "all-ignored", "float-class-ids", "uint8"],
)
def test_bad_classification_labels_name_the_problem(tiny, labels, error, message):
    model = CMSAForImageClassification(tiny).eval()
    with pytest.raises(error, match=message):
        model(torch.randn(2, 3, 16, 16), labels=labels)
    assert model.config.problem_type is None  # a refused call infers nothing


def test_problem_type_inferred_by_a_first_call_is_named_by_the_next(tiny):
    """transformers sets problem_type from the first labels and keeps it: the later call's error says so."""
    model = CMSAForImageClassification(tiny).eval()
    pixels = torch.randn(2, 3, 16, 16)
    model(pixels, labels=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))  # multi-label targets, as before
    assert model.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match=r"config.problem_type is 'multi_label_classification' \(.*inferred by transformers from the first labels.*float targets of shape \(2, 3\)"):
        model(pixels, labels=torch.tensor([0, 2]))


def test_explicit_problem_types_check_their_labels():
    single = CMSAForImageClassification(tiny_config(problem_type="single_label_classification")).eval()
    with pytest.raises(ValueError, match=r"'single_label_classification'.*integer class indices \(int64\), got dtype torch.float32"):
        single(torch.randn(2, 3, 16, 16), labels=torch.tensor([0.0, 1.0]))
    regression = CMSAForImageClassification(tiny_config(num_labels=1)).eval()
    with pytest.raises(ValueError, match=r"'regression'.*float targets of shape \(2, 1\) or \(2,\), got dtype torch.int64"):
        regression(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("num_labels", [0, -1])
def test_a_classifier_needs_a_label(num_labels):
    with pytest.raises(ValueError, match=rf"CMSAForImageClassification needs num_labels >= 1, got {max(num_labels, 0)}"):
        CMSAForImageClassification(tiny_config(num_labels=num_labels))


@pytest.mark.parametrize(
    "model_class, keyword, message",
    [
        (CMSAForImageClassification, "label", r"CMSAForImageClassification.forward\(\) got unexpected keyword argument\(s\) 'label' \(did you mean 'labels'\?\)"),
        (CMSAForKeypointDetection, "labels", r"CMSAForKeypointDetection.forward\(\) got unexpected keyword argument\(s\) 'labels'.*target_heatmaps"),
        (CMSAForHeadPoseEstimation, "flip", r"CMSAForHeadPoseEstimation.forward\(\) .*'flip' \(did you mean 'flip_test'\?\)"),
        (CMSAModel, "output_hidden_state", r"CMSAModel.forward\(\) .*'output_hidden_state' \(did you mean 'output_hidden_states'\?\)"),
    ],
)
def test_unknown_keyword_arguments_are_errors(model_class, keyword, message):
    model = model_class(tiny_config()).eval()
    with pytest.raises(TypeError, match=message):
        model(torch.randn(2, 3, 16, 16), **{keyword: torch.tensor([0, 1])})


def test_transformers_keyword_arguments_are_still_accepted(tiny):
    """What Trainer and generic transformers code pass to any model (num_items_in_batch, ...) is ignored, as there."""
    model = CMSAForImageClassification(tiny).eval()
    out = model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]), num_items_in_batch=2)
    assert out.loss is not None


# --------------------------------------------------------------------------------------------- save / load


def _nontrivial(model):
    """Move every weight and statistic away from its initial value, so a re-initialisation on load shows."""
    randomise_batch_norms(model, seed=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CMSAWindowAttention):
                module.attention_bias.normal_()
    return model


def test_save_load_round_trip_is_exact(tmp_path, tiny):
    torch.manual_seed(0)
    model = _nontrivial(CMSAForImageClassification(tiny)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is CMSAForImageClassification and not loaded.training
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)
    # The bias index is a non-persistent buffer: it must be rebuilt on load, not left as uninitialised memory.
    for module, original in zip(loaded.modules(), model.modules()):
        if isinstance(module, CMSAWindowAttention):
            assert torch.equal(module.attention_bias_index, original.attention_bias_index)


def test_auto_classes_are_registered(tmp_path, tiny):
    assert type(AutoConfig.for_model("cmsa")) is CMSAConfig
    assert type(AutoModel.from_config(tiny)) is CMSAModel
    assert type(AutoModelForImageClassification.from_config(tiny)) is CMSAForImageClassification
    CMSAForImageClassification(tiny).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is CMSAModel  # the backbone of a classifier checkpoint


def test_mismatched_checkpoint_names_the_parameter(tmp_path, tiny):
    CMSAForImageClassification(tiny).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_sizes"] = [16, 24, 40]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"cmsa\.stages\.2\..*checkpoint \(32.*\) vs model \(40"):
        CMSAForImageClassification.from_pretrained(tmp_path)


def test_new_label_count_needs_ignore_mismatched_sizes(tmp_path, tiny):
    torch.manual_seed(0)
    original = _nontrivial(CMSAForImageClassification(tiny)).eval()
    original.save_pretrained(tmp_path)
    id2label = {i: f"new-{i}" for i in range(5)}
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    with pytest.raises(RuntimeError, match=r"head\.classifier\.weight: checkpoint \(3, 36\) vs model \(5, 36\)"):
        CMSAForImageClassification.from_pretrained(tmp_path, **labels)
    model = CMSAForImageClassification.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **labels)
    assert model.head.classifier.out_features == 5 and model.config.num_labels == 5
    torch.testing.assert_close(model.cmsa.state_dict(), original.cmsa.state_dict())


def test_missing_weights_are_initialised_and_reported(tmp_path, tiny):
    # transformers' convention: initialised by _init_weights, listed in missing_keys; plus a warning naming them.
    torch.manual_seed(0)
    original = _nontrivial(CMSAForImageClassification(tiny))
    state = {k: v for k, v in original.state_dict().items() if not k.startswith("cmsa.stages.2.")}
    CMSAForImageClassification(tiny).save_pretrained(tmp_path, state_dict=state)
    with pytest.warns(UserWarning, match=r"partial CMSA checkpoint: \d+ backbone weights .*cmsa\.stages\.2\.blocks"):
        model, info = CMSAForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {k for k in original.state_dict() if k.startswith("cmsa.stages.2.")}
    fresh = CMSAForImageClassification(tiny).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("cmsa.stages.2.") and "norm" in key and key.endswith("weight"):
            torch.testing.assert_close(value, fresh[key])  # _init_weights' ones, not uninitialised memory
        elif not key.startswith("cmsa.stages.2."):
            assert torch.equal(value, original.state_dict()[key]), key


def test_from_pretrained_without_a_checkpoint(tiny):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight initialised, as asked: no warning
        model = CMSAForImageClassification.from_pretrained(None, config=tiny, state_dict={})
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    state = CMSAForImageClassification(tiny).state_dict()
    loaded = CMSAForImageClassification.from_pretrained(None, config=tiny, state_dict=state)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("loading", [{"device_map": "cpu"}, {"low_cpu_mem_usage": True}])
def test_auto_class_loads_on_meta_first(tmp_path, tiny, loading):
    torch.manual_seed(0)
    original = _nontrivial(CMSAForImageClassification(tiny)).eval()
    original.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, **loading)
    assert type(loaded) is CMSAForImageClassification
    assert {p.device.type for p in loaded.parameters()} | {b.device.type for b in loaded.buffers()} == {"cpu"}
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixels).logits, original(pixels).logits, rtol=0, atol=0)


def test_model_builds_on_the_meta_device(tiny):
    with torch.device("meta"):
        model = CMSAForImageClassification(tiny)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    rates = [block.drop_path_rate for stage in model.cmsa.stages for block in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, tiny.drop_path_rate, sum(tiny.depths)).tolist())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load(tmp_path, tiny, value):
    model = CMSAForImageClassification(tiny)
    with torch.no_grad():
        model.cmsa.stages[1].blocks[0].mlp.fc1.weight[0, :3] = value
    model.save_pretrained(tmp_path)
    kind = "3 NaN, 0 inf" if value != value else "0 NaN, 3 inf"
    with pytest.raises(ValueError, match=rf"non-finite.*\n  cmsa\.stages\.1\.blocks\.0\.mlp\.fc1\.weight \({kind}"):
        CMSAForImageClassification.from_pretrained(tmp_path)


def test_config_without_a_computational_field_warns(tmp_path, tiny):
    CMSAForImageClassification(tiny.__class__(**{**tiny.to_dict(), "hidden_act": "relu"})).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_act"], config["skeleton"]  # the activation changes the computation; the skeleton does not
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"does not set hidden_act; the defaults are used \(hidden_act='gelu'\)") as record:
        CMSAForImageClassification.from_pretrained(tmp_path)
    assert not any("skeleton" in str(w.message) for w in record)
    # Given as a keyword, the field is not missing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CMSAForImageClassification.from_pretrained(tmp_path, hidden_act="relu").config.hidden_act == "relu"


def test_another_tasks_checkpoint_warns_with_what_was_dropped_and_initialised(tmp_path, tiny):
    CMSAForKeypointDetection(tiny).save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as record:
        model = CMSAForImageClassification.from_pretrained(tmp_path)
    message = " ".join(str(w.message) for w in record)
    assert "CMSAForKeypointDetection checkpoint loaded as CMSAForImageClassification" in message
    # The fusion neck is the same module in both heads: it loads, only the task's own layers do not.
    assert re.search(r"Initialised with _init_weights: head\.classifier \(2 tensors\)", message)
    assert re.search(r"Dropped \(not used by CMSAForImageClassification\): head\.heatmaps\.bn, head\.heatmaps\.conv ", message)
    assert torch.isfinite(model.head.classifier.weight).all()


def test_backbone_of_a_task_checkpoint_loads_silently(tmp_path, tiny):
    CMSAForImageClassification(tiny).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(CMSAModel.from_pretrained(tmp_path)) is CMSAModel


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny):
    CMSAForImageClassification(tiny).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(OSError, match="corrupt or truncated"):
        CMSAForImageClassification.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------- reparameterization


def _reparam_close(module, inputs, atol):
    randomise_batch_norms(module, seed=3).eval()
    with torch.no_grad():
        before = module(*inputs)
        reparameterize_model(module)
        after = module(*inputs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CMSAConvBN(8, 16, 3),
        lambda: CMSAReparamConv(8, 8, 3, groups=8),  # positional encoding: kxk + 1x1 + identity
        lambda: CMSAReparamConv(8, 8, 3, stride=2, groups=8),  # stage embedding: no identity at stride 2
        lambda: CMSAReparamConv(3, 3, 3, groups=3),
        lambda: CMSAReparamConv(8, 8, 1),  # pointwise with identity
        lambda: CMSAReparamConv(8, 16, 1),  # pointwise, conv + BN only
    ],
)
def test_each_reparameterizable_conv_folds_exactly(make):
    torch.manual_seed(0)
    _reparam_close(make(), (torch.randn(2, module_channels(make), 8, 6),), atol=1e-5)


def module_channels(make):
    module = make()
    first = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return first.in_channels


def test_upsample_embedding_and_block_fold_exactly(tiny):
    torch.manual_seed(0)
    _reparam_close(CMSAUpsample(tiny, 8, 4), (torch.randn(2, 8, 4, 4),), atol=1e-5)
    _reparam_close(CMSAEmbedding(tiny, 8, 16, 2, activate_output=False), (torch.randn(2, 8, 8, 8),), atol=1e-5)
    _reparam_close(CMSABlock(tiny, 0, 0.0), (torch.randn(2, 16, 16, 16),), atol=1e-4)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_reparameterized_model_matches_multi_branch(name):
    # float64: a random (untrained) network's stage-3 attention saturates, which makes float32 rounding
    # differences grow chaotically; in float64 the comparison isolates the algebra of the fold.
    config = CMSAConfig.from_variant(name, image_size=(32, 24), num_labels=10)
    torch.manual_seed(0)
    model = randomise_batch_norms(CMSAForImageClassification(config), seed=2).double().eval()
    pixels = torch.randn(4, 3, 32, 24, dtype=torch.float64)
    with torch.no_grad():
        before = model(pixels, output_hidden_states=True)
        trained_count = model.num_parameters()
        assert model.reparameterize() is model
        after = model(pixels, output_hidden_states=True)
    assert model.config.reparameterized and model.num_parameters() < trained_count
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (after.logits - before.logits).abs().max() <= 1e-4
    for stage_after, stage_before in zip(after.hidden_states, before.hidden_states):
        relative = (stage_after - stage_before).abs().max() / stage_before.abs().max()
        assert relative <= 1e-9


def test_reparameterize_is_idempotent_and_reloads(tmp_path, tiny):
    torch.manual_seed(0)
    model = _nontrivial(CMSAForImageClassification(tiny)).reparameterize()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.reparameterize()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["reparameterized"] is True
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.reparameterized and loaded.state_dict().keys() == model.state_dict().keys()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_reparameterized_checkpoint_with_a_multi_branch_config_is_refused(tmp_path, tiny):
    CMSAForImageClassification(tiny).reparameterize().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["reparameterized"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"are reparameterized \(for example .*reparam_conv.*need reparameterized=true"):
        CMSAForImageClassification.from_pretrained(tmp_path)


def test_training_a_reparameterized_model_is_refused(tiny):
    model = CMSAForImageClassification(tiny).reparameterize()
    model.train()
    with pytest.raises(RuntimeError, match="reparameterized.*inference-only"):
        model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))


def test_reparameterized_copy_leaves_the_original_trainable(tiny):
    model = CMSAForImageClassification(tiny)
    inference = copy.deepcopy(model).reparameterize()
    assert inference.config is not model.config and not model.config.reparameterized
    model.train()(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1])).loss.backward()


def test_reparameterize_leaves_the_shared_config_unfolded(tiny):
    """A model built afterwards from the same config object is multi-branch and trains."""
    folded = CMSAForImageClassification(tiny).reparameterize()
    assert folded.config.reparameterized and not tiny.reparameterized
    assert all(module.config is folded.config for module in folded.modules() if hasattr(module, "config"))
    later = CMSAForImageClassification(tiny)
    assert not later.config.reparameterized
    later.train()(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1])).loss.backward()


def test_saved_folder_carries_the_code_for_remote_loading(tmp_path, tiny):
    CMSAForImageClassification(tiny).save_pretrained(tmp_path)
    assert {"modeling_cmsa.py", "configuration_cmsa.py"} <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_cmsa.CMSAForImageClassification"


# --------------------------------------------------------------------------------------------- task heads


TASK_MODELS = {
    "image-classification": CMSAForImageClassification,
    "keypoint-detection": CMSAForKeypointDetection,
    "head-pose-estimation": CMSAForHeadPoseEstimation,
}
REGISTERED_HEADS = [(task, name) for task, heads in TASK_HEADS.items() for name in heads]


def _model_with_head(task: str, name: str, seed: int = 1):
    fields = {HEAD_FIELDS[task]: name} if task in HEAD_FIELDS else {}
    torch.manual_seed(0)
    return randomise_batch_norms(TASK_MODELS[task](tiny_config(**fields)), seed=seed).double().eval()


def _targets(task: str, outputs: dict) -> dict:
    if task == "image-classification":
        return {"labels": torch.tensor([0, 2])}
    if task == "keypoint-detection":
        heatmaps = outputs["heatmaps"]
        return {"target_heatmaps": torch.rand_like(heatmaps), "target_weights": torch.ones(heatmaps.shape[:2], dtype=heatmaps.dtype)}
    return {"labels": torch.tensor([[30.0, -10.0, 5.0], [-60.0, 20.0, 0.0]], dtype=torch.float64)}


def test_every_task_has_its_model_and_heads_registered():
    assert set(TASK_HEADS) == set(TASK_MODELS) == {model.pipeline_task for model in TASK_MODELS.values()}
    assert all(field in CMSAConfig.__annotations__ for field in HEAD_FIELDS.values())


@pytest.mark.parametrize("task, name", REGISTERED_HEADS, ids=[f"{t}-{n}" for t, n in REGISTERED_HEADS])
def test_every_registered_head_follows_the_protocol(task, name):
    model = _model_with_head(task, name)
    head = model.head
    assert isinstance(head, CMSAHead) and type(head).__name__ == TASK_HEADS[task][name]
    assert (model.cmsa.fusion is not None) == (head.reads == "fused") and head.reads in ("fused", "stages")
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    backbone = model.cmsa(pixels, output_hidden_states=True)
    features = head.features(backbone)
    if head.reads == "fused":
        assert features.shape == (2, sum(model.config.hidden_sizes), 16, 16)
    else:
        assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4)]
    outputs = head(features)
    assert isinstance(outputs, dict) and outputs and all(isinstance(v, torch.Tensor) for v in outputs.values())
    full = model(pixels)
    for key, value in outputs.items():  # the head's outputs are the model output's fields
        torch.testing.assert_close(full[key], value)
    loss = head.loss(**outputs, **_targets(task, outputs))
    assert loss.dim() == 0 and torch.isfinite(loss)
    mirrored = head.mirror(outputs)
    assert {k: v.shape for k, v in mirrored.items()} == {k: v.shape for k, v in outputs.items()}
    for key, value in head.mirror(mirrored).items():  # mirroring twice is the identity
        torch.testing.assert_close(value, outputs[key], rtol=0, atol=0)


@pytest.mark.parametrize("task, name", REGISTERED_HEADS, ids=[f"{t}-{n}" for t, n in REGISTERED_HEADS])
def test_flip_test_helper_matches_the_previous_per_task_flip_tests(task, name):
    """The flip test as each model computed it before `flip_test_average`: keypoints averaged the heatmaps with the
    mirrored crop's flipped back (left / right swapped); head pose averaged the angles with the mirrored face's yaw
    and roll negated, and (binned) the logits with its yaw and roll bins reversed. Classification averages logits."""
    model = _model_with_head(task, name)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        direct = model.cmsa(pixels, output_hidden_states=True)
        mirrored = model.cmsa(pixels.flip(-1), output_hidden_states=True)
        flipped = model(pixels, flip_test=True)
    if task == "keypoint-detection":
        expected = {"heatmaps": 0.5 * (model.head(direct.last_hidden_state)["heatmaps"] + flip_heatmaps_back(
            model.head(mirrored.last_hidden_state)["heatmaps"], model.config.flip_pairs))}  # fmt: skip
    elif task == "head-pose-estimation":
        own, other = model.head(direct.hidden_states), model.head(mirrored.hidden_states)
        expected = {"angles": 0.5 * (own["angles"] + mirror_angles(other["angles"]))}
        if name == "binned":
            expected["logits"] = 0.5 * (own["logits"] + CMSABinnedAngleHead.mirror_logits(other["logits"]))
    else:
        expected = {"logits": 0.5 * (model.head(direct.last_hidden_state)["logits"] + model.head(mirrored.last_hidden_state)["logits"])}
    for key, value in expected.items():
        torch.testing.assert_close(flipped[key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_class", [CMSAModel, *TASK_MODELS.values()])
def test_no_weight_decay_lists_biases_norms_and_attention_biases(model_class):
    model = model_class(tiny_config())
    exempt = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert exempt <= set(names)
    attention_biases = {n for n in names if n.endswith(".attention_bias")}
    assert len(attention_biases) == sum(len(heads) for heads in model.config.num_heads)  # one table per group
    norms = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) for p in ("weight", "bias")}
    biases = {n for n in names if n.endswith(".bias")}
    assert exempt == attention_biases | norms | biases
    # The same parameters as the rule it replaced (1-D parameters and attention biases), which the README's runs used.
    assert exempt == {n for n, p in names.items() if p.ndim <= 1 or n.endswith("attention_bias")}
    assert not any(names[n].ndim > 1 and not n.endswith("attention_bias") for n in exempt)


def test_no_weight_decay_collects_what_modules_declare():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4, 4))
            self.linear = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"gain"}

    model = nn.Sequential(Scaled(), nn.GroupNorm(2, 4))
    assert no_weight_decay_names(model) == {"0.gain", "0.linear.bias", "1.weight", "1.bias"}


def test_a_classification_checkpoint_with_the_old_weight_names_loads(tmp_path, tiny):
    """Before `CMSAClassificationHead`, the neck and classifier sat on the model (`neck.*`, `classifier.*`)."""
    torch.manual_seed(0)
    model = _nontrivial(CMSAForImageClassification(tiny)).eval()
    model.save_pretrained(tmp_path / "new")
    old_names = {re.sub(r"^head\.", "", key): value for key, value in model.state_dict().items()}
    assert "neck.projection.conv.weight" in old_names and "classifier.weight" in old_names
    (tmp_path / "old").mkdir()
    save_file({k: v.contiguous() for k, v in old_names.items()}, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing initialised, nothing dropped
        loaded, info = CMSAForImageClassification.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixels).logits, model(pixels).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "resaved")  # saved under the current names
    with safe_open(tmp_path / "resaved" / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(model.state_dict())
