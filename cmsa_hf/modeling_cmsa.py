"""PyTorch CMSA: cascaded multi-scale attention for low-resolution images.

The file follows the paper top-down (Fig. 2): reparameterizable convolutions -> stem and stage embeddings ->
cascaded multi-scale attention (spatial fusion, channel fusion, window attention) -> block -> stage ->
multi-stage fusion -> `CMSAModel` -> task heads. Where the paper is vague it follows the authors' released
code (github.com/xyongLu/CMSA, `models/cmasformer.py`); see `configuration_cmsa.py` for the numbers.
"""

import contextlib
import copy
import difflib
import inspect
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput, TransformersKwargs

from .codecs import AngleBinCodec, flip_heatmaps_back, mirror_angles
from .configuration_cmsa import HEAD_FIELDS, TASK_HEADS, CMSAConfig


# ----------------------------------------------------------------------------------------------------------------
# Gradient layout
# ----------------------------------------------------------------------------------------------------------------


def is_channels_last(hidden_states: torch.Tensor) -> bool:
    """Whether a (batch, C, H, W) map (or a channel slice of one) is laid out channels-last."""
    return hidden_states.stride(1) < hidden_states.stride(3)


class _DenseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states):
        ctx.memory_format = torch.channels_last if is_channels_last(hidden_states) else torch.contiguous_format
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.memory_format)


def dense_gradient(hidden_states: torch.Tensor) -> torch.Tensor:
    """`hidden_states` itself, whose gradient reaches the layers that made it dense and in its own memory layout.

    For a map that is then windowed or concatenated, whose backward passes hand on permuted or sliced gradients: on
    CPU a convolution, BatchNorm, GELU or pooling backward whose gradient and input differ in layout runs a slow
    strided loop (3-10x). Shapes: (batch, C, H, W).
    """
    if not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return hidden_states
    return _DenseGradient.apply(hidden_states)


def spatial_mean(hidden_states: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C): the mean over positions, as a sum whose (batch, C) result is divided. Its
    backward pass hands on a broadcast view of the gradient, where `mean`'s divides a full map laid out NCHW, which
    the channels-last layers before it would read in that slow loop (see `dense_gradient`)."""
    return hidden_states.sum(dim=(2, 3)) / (hidden_states.shape[2] * hidden_states.shape[3])


# ----------------------------------------------------------------------------------------------------------------
# Reparameterizable convolutions (MobileOne / RepVGG style)
# ----------------------------------------------------------------------------------------------------------------


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """Fold an eval-mode BatchNorm that follows a convolution into the convolution's kernel and bias.

    `weight` has its output channels on dim 0 (a Conv2d, or a depthwise ConvTranspose2d).
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def _conv_with(conv: nn.Conv2d | nn.ConvTranspose2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of `conv`'s geometry holding the given kernel and a bias."""
    kind = type(conv)
    fused = kind(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    fused.weight.data.copy_(weight)
    fused.bias.data.copy_(bias)
    return fused


class CMSAConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm; `reparameterize()` folds them into one biased convolution."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, eps=1e-5, inference_mode=False):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=inference_mode
        )
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(hidden_states))

    def fused_kernel_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_batch_norm(self.conv.weight, self.conv.bias, self.bn)

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.bn, nn.Identity):
            return
        self.conv = _conv_with(self.conv, *self.fused_kernel_and_bias())
        self.bn = nn.Identity()


class CMSAReparamConv(nn.Module):
    """Train-time multi-branch convolution, then an activation.

    Branches: a kxk conv + BN, a 1x1 conv + BN with the same groups and stride (only when k > 1), and a bare BN
    identity (only with equal in / out channels and stride 1). `reparameterize()` sums them into one kxk conv.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, groups=1, activation=None, eps=1e-5, inference_mode=False
    ):
        super().__init__()
        self.in_channels, self.groups = in_channels, groups
        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=True
            )
        else:
            self.conv = CMSAConvBN(in_channels, out_channels, kernel_size, stride, groups, eps)
            self.scale = CMSAConvBN(in_channels, out_channels, 1, stride, groups, eps) if kernel_size > 1 else None
            has_identity = in_channels == out_channels and stride == 1
            self.identity = nn.BatchNorm2d(in_channels, eps=eps) if has_identity else None
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.activation(self.reparam_conv(hidden_states))
        out = self.conv(hidden_states)
        if self.scale is not None:
            out = out + self.scale(hidden_states)
        if self.identity is not None:
            out = out + self.identity(hidden_states)
        return self.activation(out)

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """The identity as a kxk kernel: a centre tap on each channel's own input."""
        kernel = torch.zeros_like(like)
        centre = like.shape[-1] // 2
        channels = torch.arange(self.in_channels, device=like.device)
        kernel[channels, channels % (self.in_channels // self.groups), centre, centre] = 1
        return kernel

    @torch.no_grad()
    def reparameterize(self):
        if hasattr(self, "reparam_conv"):
            return
        weight, bias = self.conv.fused_kernel_and_bias()
        if self.scale is not None:
            scale_weight, scale_bias = self.scale.fused_kernel_and_bias()
            pad = weight.shape[-1] // 2
            weight, bias = weight + F.pad(scale_weight, [pad] * 4), bias + scale_bias
        if self.identity is not None:
            identity_weight, identity_bias = fold_batch_norm(self._identity_kernel(weight), None, self.identity)
            weight, bias = weight + identity_weight, bias + identity_bias
        self.reparam_conv = _conv_with(self.conv.conv, weight, bias)
        del self.conv, self.scale, self.identity


# ----------------------------------------------------------------------------------------------------------------
# Stem and stage embeddings (Fig. 2a)
# ----------------------------------------------------------------------------------------------------------------


class CMSAEmbedding(nn.Module):
    """Reparameterizable depthwise kxk conv + activation, then a reparameterizable pointwise 1x1 conv.

    Shapes: (batch, in_channels, H, W) -> (batch, out_channels, H / stride, W / stride).
    """

    def __init__(self, config: CMSAConfig, in_channels: int, out_channels: int, stride: int, activate_output: bool):
        super().__init__()
        common = {"eps": config.batch_norm_eps, "inference_mode": config.reparameterized}
        self.depthwise = CMSAReparamConv(
            in_channels, in_channels, config.conv_kernel_size, stride, groups=in_channels,
            activation=ACT2FN[config.hidden_act], **common,
        )  # fmt: skip
        output_activation = ACT2FN[config.hidden_act] if activate_output else None
        self.pointwise = CMSAReparamConv(in_channels, out_channels, 1, activation=output_activation, **common)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(hidden_states))


class CMSAStem(nn.Module):
    """Two embeddings, each followed by the activation: num_channels -> C1 / 2 -> C1 at `stem_stride`."""

    def __init__(self, config: CMSAConfig):
        super().__init__()
        width = config.hidden_sizes[0]
        self.first = CMSAEmbedding(config, config.num_channels, width // 2, config.stem_stride, activate_output=True)
        self.second = CMSAEmbedding(config, width // 2, width, 1, activate_output=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(pixel_values))


# ----------------------------------------------------------------------------------------------------------------
# Cascaded multi-scale attention (Fig. 2c, eqs. 1-2)
# ----------------------------------------------------------------------------------------------------------------


class CMSASpatialFusion(nn.Module):
    """SF: x + DWConv-BN(x) -> activation -> PWConv-BN (the inner residual is in the authors' code)."""

    def __init__(self, config: CMSAConfig, channels: int):
        super().__init__()
        common = {"eps": config.batch_norm_eps, "inference_mode": config.reparameterized}
        self.depthwise = CMSAConvBN(channels, channels, config.conv_kernel_size, groups=channels, **common)
        self.activation = ACT2FN[config.hidden_act]
        self.pointwise = CMSAConvBN(channels, channels, 1, **common)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.activation(hidden_states + self.depthwise(hidden_states)))


ATTENTION_CHUNK_BYTES = 16 * 2**20


class ChunkedWindowAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v over windows, for training where no fused kernel learns the bias (CPU).

    It runs the eager path's arithmetic (matmul, scale, add the bias, softmax, matmul) in chunks of windows and keeps
    q, k and v for the backward pass instead of the (windows, heads, Nq, Nkv) probabilities, which the backward
    recomputes chunk by chunk: neither pass holds more than about `ATTENTION_CHUNK_BYTES` of scores at a time.
    query (N, heads, Nq, key_dim), key (N, heads, Nkv, key_dim), value (N, heads, Nkv, value_dim), bias (heads, Nq, Nkv)
    -> context (N, heads, Nq, value_dim), N = batch * windows.
    """

    @staticmethod
    def _chunks(query: torch.Tensor, bias: torch.Tensor):
        rows = max(1, ATTENTION_CHUNK_BYTES // (bias.numel() * bias.element_size()))
        return [slice(start, start + rows) for start in range(0, query.shape[0], rows)]

    @staticmethod
    def _probabilities(query, key, bias, scale) -> torch.Tensor:
        return torch.matmul(query, key.transpose(-2, -1)).mul_(scale).add_(bias).softmax(dim=-1)

    @staticmethod
    def forward(ctx, query, key, value, bias, scale: float):
        ctx.save_for_backward(query, key, value, bias)
        ctx.scale = scale
        context = value.new_empty(*query.shape[:-1], value.shape[-1])
        for rows in ChunkedWindowAttention._chunks(query, bias):
            probabilities = ChunkedWindowAttention._probabilities(query[rows], key[rows], bias, scale)
            torch.matmul(probabilities, value[rows], out=context[rows])
        return context

    @staticmethod
    def backward(ctx, grad_context):
        query, key, value, bias = ctx.saved_tensors
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        grad_bias = torch.zeros_like(bias)
        for rows in ChunkedWindowAttention._chunks(query, bias):
            probabilities = ChunkedWindowAttention._probabilities(query[rows], key[rows], bias, ctx.scale)
            grad = grad_context[rows]
            torch.matmul(probabilities.transpose(-2, -1), grad, out=grad_value[rows])
            grad_probabilities = torch.matmul(grad, value[rows].transpose(-2, -1))
            grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, probabilities.dtype)
            grad_bias += grad_scores.sum(dim=0)
            grad_scores.mul_(ctx.scale)
            torch.matmul(grad_scores, key[rows], out=grad_query[rows])
            torch.matmul(grad_scores.transpose(-2, -1), query[rows], out=grad_key[rows])
        return grad_query, grad_key, grad_value, grad_bias, None


class CMSAWindowAttention(nn.Module):
    """Multi-head attention of one head group inside non-overlapping windows.

    Queries are windows of `window_size` on the full map; keys / values are the same windows on the map pooled
    by `pool_ratio`. A learned bias per head, indexed by the offset (|dy|, |dx|) between a query position and a
    key position (each in its own grid, not rescaled), is shared by all windows (LeViT style).
    """

    def __init__(self, config: CMSAConfig, num_heads: int, window_size: tuple[int, int], pool_ratio: int):
        super().__init__()
        self.config = config
        self.num_heads, self.key_dim, self.value_dim = num_heads, config.key_dim, config.value_dim
        self.window_size = tuple(window_size)
        self.kv_window_size = (window_size[0] // pool_ratio, window_size[1] // pool_ratio)
        self.scale = self.key_dim**-0.5
        # |dy| < window height and |dx| < window width: one bias per head and offset.
        self.attention_bias = nn.Parameter(torch.zeros(num_heads, window_size[0] * window_size[1]))
        self.register_buffer("attention_bias_index", self.relative_bias_index(), persistent=False)

    def no_weight_decay(self) -> set[str]:
        """The bias table is trained without weight decay (timm's convention)."""
        return {"attention_bias"}

    def relative_bias_index(self) -> torch.Tensor:
        """(queries per window, keys per window) index into `attention_bias`: |dy| * window width + |dx|."""
        query_y, query_x = torch.meshgrid(
            torch.arange(self.window_size[0]), torch.arange(self.window_size[1]), indexing="ij"
        )
        key_y, key_x = torch.meshgrid(
            torch.arange(self.kv_window_size[0]), torch.arange(self.kv_window_size[1]), indexing="ij"
        )
        offset_y = (query_y.reshape(-1, 1) - key_y.reshape(1, -1)).abs()
        offset_x = (query_x.reshape(-1, 1) - key_x.reshape(1, -1)).abs()
        return offset_y * self.window_size[1] + offset_x

    def forward(
        self, query: torch.Tensor, key_value: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (batch, heads * key_dim, H, W), key_value (batch, heads * (key_dim + value_dim), H / r, W / r)
        -> context (batch, heads * value_dim, H, W) and, with `output_attentions` on the eager path, the attention
        weights (batch, windows, heads, window tokens, pooled window tokens), windows in row-major order."""
        batch, _, height, width = query.shape
        (window_h, window_w), (kv_h, kv_w) = self.window_size, self.kv_window_size
        rows, cols = height // window_h, width // window_w
        heads = self.num_heads
        channels_last = is_channels_last(query)
        query, key_value = dense_gradient(query), dense_gradient(key_value)

        # (batch * windows, heads, tokens per window, channels)
        query = query.view(batch, heads, self.key_dim, rows, window_h, cols, window_w)
        query = query.permute(0, 3, 5, 1, 4, 6, 2).reshape(batch * rows * cols, heads, window_h * window_w, -1)
        key_value = key_value.view(batch, heads, self.key_dim + self.value_dim, rows, kv_h, cols, kv_w)
        key_value = key_value.permute(0, 3, 5, 1, 4, 6, 2).reshape(batch * rows * cols, heads, kv_h * kv_w, -1)
        key, value = key_value.split([self.key_dim, self.value_dim], dim=-1)

        bias = self.attention_bias[:, self.attention_bias_index].to(query.dtype)  # (heads, Nq, Nkv)
        weights = None
        if self.config._attn_implementation == "eager":
            # The explicit path, scaling and adding the bias in place (autograd needs neither input of those). On CPU,
            # SDPA's only kernel for a float mask with key dim != value dim is this same math, plus masking passes.
            scores = torch.matmul(query, key.transpose(-2, -1)).mul_(self.scale).add_(bias)
            # The returned weights are the ones the context is computed from (so that they can retain a gradient).
            weights = scores.softmax(dim=-1).view(batch, rows * cols, heads, window_h * window_w, kv_h * kv_w)
            context = torch.matmul(weights.flatten(0, 1), value)
        else:
            context = self._fused_attention(query, key, value, bias)
        weights = weights if output_attentions else None

        # Back to a (batch, heads * value_dim, H, W) map, laid out as the input was (channels_last stays so, which
        # spares the projection convolution a layout conversion).
        context = context.view(batch, rows, cols, heads, window_h, window_w, self.value_dim)
        if channels_last:
            context = context.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, heads * self.value_dim)
            return context.permute(0, 3, 1, 2), weights
        return context.permute(0, 3, 6, 1, 4, 2, 5).reshape(batch, heads * self.value_dim, height, width), weights

    def _fused_attention(self, query, key, value, bias) -> torch.Tensor:
        """SDPA in a form its fused kernels take: queries and keys zero-padded to the value dim (the dot products do
        not change) and the bias as a 4-D mask. On CPU the fused (flash) kernel computes no gradient for the mask, so
        a training step there, where the bias learns, runs `ChunkedWindowAttention` on the plain shapes instead
        (SDPA's math path would keep the probabilities for the backward pass)."""
        if query.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad:
            return ChunkedWindowAttention.apply(query, key, value, bias, self.scale)
        padding = (0, self.value_dim - self.key_dim)
        query, key = F.pad(query, padding), F.pad(key, padding)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.unsqueeze(0), scale=self.scale)


class CMSACascadedAttention(nn.Module):
    """Cascaded multi-scale attention of one block.

    Per group k: K/V_k -> [CF_k(concat(K/V_k, X'_{k-1})) for k > 1] -> SF_k -> Pool_k -> WindowAttention_k(Q_k)
    = X'_k. Queries are never modified. Output: Linear(concat(X'_1..X'_n)).
    Shapes: (batch, C, H, W) -> (batch, C, H, W).
    """

    def __init__(self, config: CMSAConfig, stage: int):
        super().__init__()
        dim, heads = config.hidden_sizes[stage], config.num_heads[stage]
        key_dim, value_dim = config.key_dim, config.value_dim
        common = {"eps": config.batch_norm_eps, "inference_mode": config.reparameterized}
        self.query_channels = [h * key_dim for h in heads]
        self.key_value_channels = [h * (key_dim + value_dim) for h in heads]
        # One 1x1 projection for Q and KV (the authors' two convs, fused): per group and head [k, v] channels.
        self.qkv = nn.Conv2d(dim, sum(self.query_channels) + sum(self.key_value_channels), 1)
        self.channel_fusions = nn.ModuleList(
            CMSAConvBN(self.key_value_channels[k] + heads[k - 1] * value_dim, self.key_value_channels[k], **common)
            for k in range(1, len(heads))
        )
        self.spatial_fusions = nn.ModuleList(CMSASpatialFusion(config, c) for c in self.key_value_channels)
        self.pools = nn.ModuleList(
            nn.AvgPool2d(r) if r > 1 else nn.Identity() for r in config.kv_pool_ratios[stage]
        )
        self.attentions = nn.ModuleList(
            CMSAWindowAttention(config, h, window, ratio)
            for h, window, ratio in zip(heads, config.window_sizes(stage), config.kv_pool_ratios[stage])
        )
        # The authors' output projection is an nn.Linear over channels; a 1x1 conv here (no layout change), marked so
        # that it gets the Linear init (trunc-normal, std initializer_range): see CMSAPreTrainedModel._init_weights.
        self.proj = nn.Conv2d(sum(heads) * value_dim, dim, 1)
        self.proj.is_channel_linear = True

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...] | None]:
        """Also returns the block's attention weights when asked (eager path, see `CMSAWindowAttention`): one tensor
        (batch, windows, heads, Nq, Nkv) with the groups' heads concatenated when all groups share windows and
        pooling (a copy: `retain_grad` on it gets no gradient, the groups being cascaded), else a tuple with one such
        tensor per group (the tensors the contexts are computed from)."""
        queries, key_values = self.qkv(hidden_states).split(
            [sum(self.query_channels), sum(self.key_value_channels)], dim=1
        )
        queries = queries.split(self.query_channels, dim=1)
        key_values = key_values.split(self.key_value_channels, dim=1)
        outputs, weights = [], []
        for group, (query, key_value) in enumerate(zip(queries, key_values)):
            if group > 0:
                key_value = self.channel_fusions[group - 1](torch.cat([key_value, outputs[-1]], dim=1))
            key_value = self.pools[group](self.spatial_fusions[group](key_value))
            context, group_weights = self.attentions[group](query, key_value, output_attentions)
            outputs.append(context)
            weights.append(group_weights)
        attentions = None
        if output_attentions and weights[0] is not None:
            shapes = {(w.shape[:2], w.shape[3:]) for w in weights}  # all but the heads
            if len(weights) == 1:
                attentions = weights[0]
            else:
                attentions = torch.cat(weights, dim=2) if len(shapes) == 1 else tuple(weights)
        return self.proj(torch.cat(outputs, dim=1)), attentions


# ----------------------------------------------------------------------------------------------------------------
# Block and stage (Fig. 2b, eqs. 3-5)
# ----------------------------------------------------------------------------------------------------------------


def drop_path(hidden_states: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole samples of a residual branch."""
    if rate == 0.0 or not training:
        return hidden_states
    keep = 1.0 - rate
    mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(keep)
    return hidden_states * mask / keep


def drop_path_rates(last_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth rates growing linearly from 0 to `last_rate` over the blocks (plain floats: building the
    model reads no tensor data, so it can be built on the meta device)."""
    if num_blocks < 2:
        return [0.0] * num_blocks
    return [last_rate * index / (num_blocks - 1) for index in range(num_blocks)]


class GELULinear(torch.autograd.Function):
    """linear(gelu(hidden)) that keeps only `hidden` for the backward pass, which recomputes gelu(hidden): the MLP's
    widest tensor (mlp_ratio x C channels) is saved once instead of twice. The same kernels as the plain path, so the
    same gradients. hidden (..., in), weight (out, in), bias (out,) -> (..., out)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        ctx.save_for_backward(hidden, weight)
        return F.linear(F.gelu(hidden), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, weight.shape[0])
        grad_activated = grad_output.mm(weight).view_as(hidden)
        grad_weight = grad_output.t().mm(F.gelu(hidden).reshape(-1, weight.shape[1]))
        return torch.ops.aten.gelu_backward(grad_activated, hidden), grad_weight, grad_output.sum(0)


class CMSAMlp(nn.Module):
    """Two-layer MLP on channels-last tokens: (..., C) -> (..., C).

    Training with the exact GELU and without autocast recomputes the activation in the backward pass
    (`GELULinear`) instead of saving it."""

    def __init__(self, config: CMSAConfig, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * config.mlp_ratio)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(dim * config.mlp_ratio, dim)
        self.recompute_activation = config.hidden_act == "gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if (self.recompute_activation and torch.is_grad_enabled() and hidden_states.requires_grad
                and not torch.is_autocast_enabled(hidden_states.device.type)):  # fmt: skip
            return GELULinear.apply(hidden_states, self.fc2.weight, self.fc2.bias)
        return self.fc2(self.activation(hidden_states))


@contextlib.contextmanager
def batch_norm_statistics_kept(module: nn.Module):
    """Restore the running statistics of `module`'s BatchNorms on exit (a replayed forward must not count twice)."""
    buffers = [buffer for norm in module.modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)
               for buffer in norm.buffers()]  # fmt: skip
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            # Through `.data`: the recomputed BatchNorms saved these buffers for their backward (a reentrant
            # checkpoint runs it after this exit), which reads no running statistic in training mode.
            buffer.data.copy_(value)


class CMSABlock(GradientCheckpointingLayer):
    """x = PE(x); x = x + DropPath(CMSA(BN(x))); x = x + DropPath(MLP(LN(x))). Shapes: (batch, C, H, W).

    With activation checkpointing on (`model.activation_checkpointing_enable()`, the Trainer's
    `gradient_checkpointing`, or `--gradient_checkpointing`), a training forward keeps only the block's input and
    the backward pass recomputes the rest. The recomputation leaves the BatchNorm running statistics as the forward
    pass left them, so a checkpointed run is the same run (losses, gradients and statistics), in less memory.
    """

    def __init__(self, config: CMSAConfig, stage: int, drop_path_rate: float):
        super().__init__()
        dim = config.hidden_sizes[stage]
        self.position_encoding = CMSAReparamConv(
            dim, dim, config.conv_kernel_size, groups=dim, activation=ACT2FN[config.hidden_act],
            eps=config.batch_norm_eps, inference_mode=config.reparameterized,
        )  # fmt: skip
        self.attention_norm = nn.Identity() if config.reparameterized else nn.BatchNorm2d(dim, config.batch_norm_eps)
        self.attention = CMSACascadedAttention(config, stage)
        self.mlp_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = CMSAMlp(config, dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        """-> (hidden_states, attention weights or None), see `CMSACascadedAttention.forward`."""
        # A forward run inside the autograd engine is the backward pass recomputing this checkpointed block.
        replaying = self.gradient_checkpointing and torch._C._current_graph_task_id() != -1
        with batch_norm_statistics_kept(self) if replaying else contextlib.nullcontext():
            return self._forward(hidden_states, output_attentions)

    def _forward(self, hidden_states: torch.Tensor, output_attentions: bool):
        hidden_states = self.position_encoding(hidden_states)
        attention, attention_weights = self.attention(self.attention_norm(hidden_states), output_attentions)
        hidden_states = hidden_states + drop_path(attention, self.drop_path_rate, self.training)
        tokens = hidden_states.permute(0, 2, 3, 1)
        tokens = tokens + drop_path(self.mlp(self.mlp_norm(tokens)), self.drop_path_rate, self.training)
        return tokens.permute(0, 3, 1, 2), attention_weights

    @torch.no_grad()
    def reparameterize(self):
        """Fold the BatchNorm before the attention into the Q/KV projection that consumes it."""
        if isinstance(self.attention_norm, nn.Identity):
            return
        norm, qkv = self.attention_norm, self.attention.qkv
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias - norm.running_mean * scale
        qkv.bias.add_(qkv.weight[:, :, 0, 0] @ shift)
        qkv.weight.mul_(scale.reshape(1, -1, 1, 1))
        self.attention_norm = nn.Identity()


class CMSAStage(nn.Module):
    """The stem (stage 1) or a stride-2 embedding (later stages), then the stage's CMSA blocks."""

    def __init__(self, config: CMSAConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        if stage == 0:
            self.embedding = CMSAStem(config)
        else:
            channels = config.hidden_sizes[stage - 1 : stage + 1]
            self.embedding = CMSAEmbedding(config, *channels, stride=2, activate_output=False)
        self.blocks = nn.ModuleList(CMSABlock(config, stage, rate) for rate in drop_path_rates)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        """-> (hidden_states, one attention entry per block, None each unless asked)."""
        hidden_states, attentions = self.embedding(hidden_states), []
        for block in self.blocks:
            hidden_states, block_attentions = block(hidden_states, output_attentions)
            attentions.append(block_attentions)
        return hidden_states, attentions


# ----------------------------------------------------------------------------------------------------------------
# Multi-stage fusion (the "FGMM" of the authors' code)
# ----------------------------------------------------------------------------------------------------------------


class CMSAUpsample(nn.Module):
    """Depthwise ConvTranspose2d (kernel = stride = factor) + BN: (batch, C, h, w) -> (batch, C, h * f, w * f)."""

    def __init__(self, config: CMSAConfig, channels: int, factor: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, factor, stride=factor, groups=channels)
        self.bn = nn.Identity() if config.reparameterized else nn.BatchNorm2d(channels, eps=config.batch_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(hidden_states))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.bn, nn.Identity):
            return
        self.conv = _conv_with(self.conv, *fold_batch_norm(self.conv.weight, self.conv.bias, self.bn))
        self.bn = nn.Identity()


class CMSAMultiScaleFusion(nn.Module):
    """Upsample every stage output to stage-1 resolution and concatenate them.

    Shapes: [(batch, C_i, H / 2^i, W / 2^i)] -> (batch, sum C_i, H, W) (H, W: the stage-1 map).
    """

    def __init__(self, config: CMSAConfig):
        super().__init__()
        self.upsamplers = nn.ModuleList(
            CMSAUpsample(config, channels, 2**stage)
            for stage, channels in enumerate(config.hidden_sizes)
            if stage > 0
        )

    def forward(self, stage_outputs: list[torch.Tensor]) -> torch.Tensor:
        upsampled = [upsample(x) for upsample, x in zip(self.upsamplers, stage_outputs[1:])]
        return torch.cat([dense_gradient(x) for x in [stage_outputs[0], *upsampled]], dim=1)


class CMSAFusionNeck(nn.Module):
    """Conv1x1 + BN (sum C -> hidden) + activation: the first half of the authors' fusion head, shared by the
    task heads. Shapes: (batch, sum C, H, W) -> (batch, hidden, H, W)."""

    def __init__(self, config: CMSAConfig):
        super().__init__()
        in_channels = sum(config.hidden_sizes)
        self.hidden_size = int(in_channels * config.fusion_hidden_ratio)
        self.projection = CMSAConvBN(
            in_channels, self.hidden_size, eps=config.batch_norm_eps, inference_mode=config.reparameterized
        )
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.activation(self.projection(fused))


# ----------------------------------------------------------------------------------------------------------------
# Task heads: the protocol, the registry lookup, the flip test
# ----------------------------------------------------------------------------------------------------------------


class CMSAHead(nn.Module):
    """What every task head is (registered per task in `configuration_cmsa.TASK_HEADS`):

    - `reads`: the `CMSAModel` output it takes. `"fused"`: `last_hidden_state` of the backbone with its multi-stage
      fusion, (batch, sum C_i, H1, W1) at stage-1 resolution (the heads that need it apply `CMSAFusionNeck` to it).
      `"stages"`: `hidden_states`, the stage outputs [(batch, C_i, H1 / 2^i, W1 / 2^i)] (backbone without fusion).
    - `forward(features) -> dict[str, Tensor]`: its outputs by name, the fields of the task's model output.
    - `loss(**outputs, **targets) -> Tensor`: the scalar loss from those outputs and the targets, by name.
    - `mirror(outputs) -> dict[str, Tensor]`: the outputs predicted on a horizontally mirrored input, mapped to the
      frame of the input itself (what the flip test averages, `flip_test_average`).
    """

    reads = "fused"

    def features(self, backbone_outputs: BaseModelOutputWithPooling):
        """The part of the backbone's outputs this head reads (see `reads`)."""
        return backbone_outputs.last_hidden_state if self.reads == "fused" else backbone_outputs.hidden_states

    def forward(self, features) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define forward (see CMSAHead)")

    def loss(self, **outputs_and_targets) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define loss (see CMSAHead)")

    def mirror(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define mirror (see CMSAHead)")


def head_class(config: CMSAConfig, task: str) -> type[CMSAHead]:
    """The head class of `task` that the config picks (`HEAD_FIELDS`; the task's only head otherwise), from
    `TASK_HEADS`."""
    heads = TASK_HEADS[task]
    name = getattr(config, HEAD_FIELDS[task]) if task in HEAD_FIELDS else next(iter(heads))
    return globals()[heads[name]]


def flip_test_average(head: CMSAHead, outputs: dict, mirrored_outputs: dict) -> dict:
    """The flip test: each of `outputs` (of the input) averaged with the same output of the mirrored input, mapped
    back by `head.mirror`. Every `CMSAFor<Task>` runs its flip test through this."""
    mirrored = head.mirror(mirrored_outputs)
    return {name: 0.5 * (value + mirrored[name]) for name, value in outputs.items()}


class CMSAClassificationHead(CMSAHead):
    """Fusion neck (Conv1x1 + BN + activation) -> global average pool -> dropout -> linear. Cross-entropy (or
    transformers' loss for `config.problem_type`). A flip does not change the class.

    Shapes: fused (batch, sum C, H1, W1) -> logits (batch, num_labels).
    """

    def __init__(self, config: CMSAConfig):
        super().__init__()
        self.config = config
        self.neck = CMSAFusionNeck(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.neck.hidden_size, config.num_labels)

    def forward(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = spatial_mean(self.neck(fused))
        return {"logits": self.classifier(self.dropout(pooled))}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' image-classification loss: CE, BCE or MSE by `config.problem_type` (inferred and set from
        the first labels when unset)."""
        return ForSequenceClassificationLoss(labels=labels, pooled_logits=logits, config=self.config)

    def mirror(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(outputs)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Fold every multi-branch convolution and conv + BN pair of `model` in place (inference form).

    Idempotent; puts the model in eval mode and marks its config `reparameterized=True`: a copy of the config, given
    to every module that shares it, so that the config object the model was built from (and other models built
    from it) stays as it was.
    """
    model.eval()
    for module in list(model.modules()):
        if not isinstance(module, PreTrainedModel) and hasattr(module, "reparameterize"):
            module.reparameterize()
    config = getattr(model, "config", None)
    if config is not None and not config.reparameterized:
        folded = copy.deepcopy(config)
        folded.reparameterized = True
        for module in model.modules():
            if getattr(module, "config", None) is config:
                module.config = folded
    return model


def check_pixel_values(pixel_values: torch.Tensor, config: CMSAConfig, dtype: torch.dtype, training: bool):
    """Raise a clear error for input the model cannot take: not a tensor (TypeError), a dtype other than the model's
    `dtype` (outside autocast), a shape other than (batch >= 1, num_channels, *image_size), and, when `training`,
    NaN / inf pixels (which would poison the BatchNorm running statistics for good). In eval mode pixels are not
    checked for NaN / inf (that is a full pass over the batch): a non-finite pixel makes that image's outputs NaN and
    leaves the other images of the batch untouched (eval-mode BatchNorm uses its running statistics)."""
    expected = (config.num_channels, *config.image_size)
    expected_text = f"(batch_size, {expected[0]}, {expected[1]}, {expected[2]})"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor {expected_text} of dtype {dtype}, got a {type(pixel_values).__name__}: "
            "convert it with torch.from_numpy / torch.as_tensor, or use CMSAImageProcessor(..., return_tensors='pt')"
        )
    shape = tuple(pixel_values.shape)
    if pixel_values.dtype != dtype and not (
        pixel_values.is_floating_point() and torch.is_autocast_enabled(pixel_values.device.type)
    ):
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype} but the model's weights are {dtype}: give {dtype} pixel "
            "values (rescaled and normalized, as CMSAImageProcessor returns them; integer images need the processor), "
            "or cast the model with model.to(dtype)"
        )
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be a 4D tensor {expected_text}, got a {pixel_values.dim()}D tensor {shape}")
    if shape[0] == 0:
        raise ValueError(f"pixel_values is an empty batch {shape}: expected {expected_text} with batch_size >= 1")
    if shape[1] != expected[0]:
        raise ValueError(
            f"pixel_values has {shape[1]} channels but the model expects {expected[0]} "
            f"(config.num_channels): expected {expected_text}, got {shape}"
        )
    if shape[2:] != expected[1:]:
        raise ValueError(
            f"pixel_values is {shape[2]}x{shape[3]} but the model was built for image_size "
            f"{expected[1]}x{expected[2]}: expected {expected_text}, got {shape}. Resize the images "
            "(CMSAImageProcessor does) or build the model with a matching config.image_size."
        )
    if training and not torch.isfinite(pixel_values).all():
        bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"pixel_values holds NaN or inf values (images {bad[:10]} of the batch) in training mode: they would "
            "poison the BatchNorm running statistics for good. Check the data (the processor refuses such images)."
        )


# Keyword arguments transformers may pass to any model (Trainer's `num_items_in_batch`, generic output flags): accepted
# and ignored, as transformers' own models do. transformers 5 models ignore every other keyword as well; here any
# other is an error, so that a misspelt argument (`label=` for `labels=`) cannot silently drop the loss.
IGNORED_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__)


def check_finite_targets(name: str, targets: torch.Tensor | None):
    """Raise a TypeError for targets that are not a tensor and a ValueError naming the samples with NaN / inf."""
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got a {type(targets).__name__}: use torch.tensor({name})")
    if targets.dim() and not torch.isfinite(targets).all():
        bad = (~torch.isfinite(targets)).reshape(targets.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} holds NaN or inf values (samples {bad[:10]} of the batch)")


# Forward arguments of transformers' VitPose that CMSA has no equivalent of, with the reason.
VITPOSE_ONLY_FORWARD_KWARGS = {
    "dataset_index": "it selects one of ViTPose++'s per-data-set expert heads; a CMSA keypoint model has one head, "
    "trained on one keypoint set (load the model trained on the set you need)",
}


def check_forward_kwargs(model: nn.Module, kwargs: dict):
    """Raise a TypeError naming the keyword arguments that `model.forward` does not take."""
    unknown = sorted(set(kwargs) - IGNORED_FORWARD_KWARGS)
    if not unknown:
        return
    for name in unknown:
        if name in VITPOSE_ONLY_FORWARD_KWARGS:
            raise TypeError(f"CMSA has no equivalent of VitPose's {name!r}: {VITPOSE_ONLY_FORWARD_KWARGS[name]}")
    accepted = [name for name in inspect.signature(type(model).forward).parameters if name not in ("self", "kwargs")]
    hints = [
        f"{name!r} (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(name, accepted, n=1)) else repr(name)
        for name in unknown
    ]
    raise TypeError(
        f"{type(model).__name__}.forward() got unexpected keyword argument(s) {', '.join(hints)}; "
        f"it takes {', '.join(accepted)}"
    )


# CMSAConfig fields that only set the initialisation or describe (drawing); every other one changes the computation.
NON_COMPUTATIONAL_CONFIG_FIELDS = ("initializer_range", "heatmap_init_scale", "skeleton")
# Hub / cache arguments of from_pretrained that locating config.json needs too.
_CONFIG_FILE_KWARGS = (
    "cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder",
)  # fmt: skip


def _warn_missing_config_fields(pretrained_model_name_or_path, kwargs):
    """Warn about CMSA fields that the checkpoint's config.json lacks (and that a keyword does not set)."""
    file_kwargs = {key: kwargs[key] for key in _CONFIG_FILE_KWARGS if key in kwargs}
    try:
        config_dict, _ = CMSAConfig.get_config_dict(pretrained_model_name_or_path, **file_kwargs)
    except OSError:
        return  # from_pretrained reports the missing file itself
    missing = [
        name
        for name in CMSAConfig.__annotations__
        if name not in NON_COMPUTATIONAL_CONFIG_FIELDS and name not in config_dict and name not in kwargs
    ]
    if missing:
        defaults = CMSAConfig()
        shown = ", ".join(f"{name}={getattr(defaults, name)!r}" for name in missing)
        warnings.warn(
            f"The config.json of {pretrained_model_name_or_path} does not set {', '.join(missing)}; the defaults are "
            f"used ({shown}), which may not be what the weights were trained with. Add the fields to config.json.",
            UserWarning,
            stacklevel=3,
        )


def _shown(lines: list[str], limit: int = 10) -> str:
    return "\n  ".join(lines[:limit]) + ("\n  ..." if len(lines) > limit else "")


def _check_finite(model: nn.Module, initialised: set[str], source):
    """Raise a ValueError naming the loaded tensors that hold NaN or inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        if name in initialised or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not finite.all():
            nan = int(torch.isnan(tensor).sum())
            bad.append(f"{name} ({nan} NaN, {finite.numel() - int(finite.sum()) - nan} inf of {tensor.numel()})")
    if bad:
        raise ValueError(f"The weights in {source} hold non-finite values ({len(bad)} tensors):\n  {_shown(bad)}")


def _check_weight_form(model: "CMSAPreTrainedModel", unexpected_keys, source):
    """Raise a ValueError for reparameterized weights under a multi-branch config, or the reverse."""
    if model.config.reparameterized:  # only multi-branch weights carry BatchNorm statistics
        other_form = [key for key in sorted(unexpected_keys) if key.endswith(".running_var")]
    else:
        other_form = [key for key in sorted(unexpected_keys) if ".reparam_conv." in key]
    if other_form:
        form, wanted = ("multi-branch", "false") if model.config.reparameterized else ("reparameterized", "true")
        raise ValueError(
            f"The weights in {source} are {form} (for example {other_form[0]}) but the config says "
            f"reparameterized={model.config.reparameterized}: check that config.json belongs to these weights "
            f"(they need reparameterized={wanted})."
        )


def _warn_initialised_weights(model: "CMSAPreTrainedModel", info: dict, source):
    """Warn, naming them, about weights initialised rather than loaded and checkpoint weights dropped."""
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if not missing:
        return

    def listing(keys):
        """The modules the tensors belong to, for example `classifier, neck.projection.conv (3 tensors)`."""
        modules = list(dict.fromkeys(key.rpartition(".")[0] or key for key in keys))
        shown = ", ".join(modules[:8]) + (f", ... ({len(modules)} modules)" if len(modules) > 8 else "")
        return f"{shown} ({len(keys)} tensors)"

    backbone_prefix = "" if isinstance(model, CMSAModel) else f"{model.base_model_prefix}."
    missing_backbone = [key for key in missing if key.startswith(backbone_prefix)]
    architectures = [name for name in (model.config.architectures or []) if name != type(model).__name__]
    if len(missing) == len(model.state_dict()):
        what = "no CMSA checkpoint of this architecture: none of its weights fit the model"
    elif missing_backbone:
        what = f"a partial CMSA checkpoint: {len(missing_backbone)} backbone weights are missing and random"
    elif architectures and unexpected:
        what = f"a {architectures[0]} checkpoint loaded as {type(model).__name__}: its task head does not fit"
    else:
        what = "a checkpoint without this task's head"
    dropped = f" Dropped (not used by {type(model).__name__}): {listing(unexpected)}." if unexpected else ""
    warnings.warn(
        f"{source} is {what}. Initialised with _init_weights: {listing(missing)}.{dropped} "
        "Train the model before using its outputs.",
        UserWarning,
        stacklevel=3,
    )


# Layers whose parameters (scale and shift) are trained without weight decay (`no_weight_decay_names`).
NORMALIZATION_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The names of `model`'s parameters to train without weight decay, collected from its modules: every module's
    `bias`, the scales and shifts of the normalisation layers, and the names a module lists in its own
    `no_weight_decay()` (timm's convention; here the attention-bias tables of `CMSAWindowAttention`)."""
    exempt = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if isinstance(module, NORMALIZATION_LAYERS):
            exempt.update(prefix + name for name in own)
        elif "bias" in own:
            exempt.add(prefix + "bias")
        if not isinstance(module, PreTrainedModel) and hasattr(module, "no_weight_decay"):
            exempt.update(prefix + name for name in module.no_weight_decay())
    return exempt


class CMSAPreTrainedModel(PreTrainedModel):
    config_class = CMSAConfig
    config: CMSAConfig
    base_model_prefix = "cmsa"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CMSABlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Linear) or getattr(module, "is_channel_linear", False):
            # A 1x1 conv standing for a Linear must start as small as one: with the convolution init (std sqrt(2 /
            # fan_out), 7x larger) the attention branches amplify the backward gradient (stage 1 of CMSA-S got
            # 60-600x the last stage's) and training from scratch stalls at predicting the mean.
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            if getattr(module, "is_heatmap_output", False):
                # Heatmaps start near zero (as HRNet's last conv, std 0.001): a unit-variance start costs hundreds
                # of steps of shrinking the output scale before any localisation is learned.
                init.constant_(module.weight, self.config.heatmap_init_scale)
            else:
                init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, CMSAWindowAttention):
            init.zeros_(module.attention_bias)
            init.copy_(module.attention_bias_index, module.relative_bias_index())


    # What a saved folder answers to without cmsa_hf installed (`trust_remote_code=True`), beside the Auto class the
    # model class itself is registered for: more Auto classes (name -> model class in this file), and the pipeline
    # task whose cmsa_hf implementation is copied into the folder as `custom_pipelines` (tasks transformers serves
    # itself, such as image-classification, need no copy).
    extra_auto_classes: dict[str, str] = {}
    pipeline_task: str | None = None
    # Old weight name (regex) -> new one, applied by `from_pretrained` to checkpoints saved by earlier versions.
    legacy_weight_names: dict[str, str] = {}

    def get_input_embeddings(self) -> nn.Module:
        """The stem: the module that turns pixels into the first feature map (pixel models' input embeddings)."""
        return self.base_model.stages[0].embedding

    def set_input_embeddings(self, value: nn.Module):
        self.base_model.stages[0].embedding = value

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the source whether attention modules dispatch through ALL_ATTENTION_FUNCTIONS;
        # CMSA's window attention reads config._attn_implementation at every call, so switching always works.
        return True

    def _wants_attentions(self, output_attentions: bool | None) -> bool:
        """Resolve `output_attentions` (argument, else config). SDPA computes no attention weights: asked for them
        it warns and returns none (use `attn_implementation="eager"`)."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            warnings.warn(
                f"output_attentions=True needs the eager attention, but this model uses "
                f"attn_implementation={self.config._attn_implementation!r}, which computes no attention weights: "
                "attentions will be None. Load or set the model with attn_implementation=\"eager\" to get them.",
                UserWarning,
                stacklevel=3,
            )
            return False
        return bool(output_attentions)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` with the config's `auto_map` and `custom_pipelines` rebuilt for this
        class (a model fine-tuned from another task's checkpoint would otherwise keep the other task's entries)."""
        module = type(self).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {auto: f"{module}.{name}" for auto, name in self.extra_auto_classes.items()}
        custom_pipelines = self._custom_pipelines(save_directory)
        if custom_pipelines:
            self.config.custom_pipelines = custom_pipelines
        elif hasattr(self.config, "custom_pipelines"):
            del self.config.custom_pipelines
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload a repository that loads through its pipeline: weights, config, remote code, the image processor
        (`processor=`, default the config's) and a CMSA model card (`card=`), by `cmsa_hf.hub.push_model_to_hub`."""
        try:
            from cmsa_hf.hub import push_model_to_hub  # noqa: PLC0415 (not needed to load the remote code)
        except ImportError:
            warnings.warn(
                "cmsa_hf is not installed: uploading with transformers' push_to_hub (no image processor, generic "
                "card); install cmsa_hf for a repository that loads through its pipeline", UserWarning, stacklevel=2,
            )  # fmt: skip
            return super().push_to_hub(repo_id, **kwargs)
        return push_model_to_hub(self, repo_id, **kwargs)

    def _custom_pipelines(self, save_directory) -> dict:
        """The `custom_pipelines` entry of `pipeline_task` (as `Pipeline.save_pretrained` writes it), its code copied
        into `save_directory`; empty when the task's pipeline is transformers' own or not registered here."""
        from transformers.pipelines import PIPELINE_REGISTRY  # noqa: PLC0415

        registered = PIPELINE_REGISTRY.supported_tasks.get(self.pipeline_task) or {}
        implementation = registered.get("impl")
        if not isinstance(implementation, type) or implementation.__module__.startswith("transformers.") or self._auto_class is None:
            return {}
        os.makedirs(save_directory, exist_ok=True)
        custom_object_save(implementation, save_directory)
        reference = f"{implementation.__module__.rsplit('.', 1)[-1]}.{implementation.__name__}"
        # The model is loaded remotely through the Auto class this class is exported under.
        return {self.pipeline_task: {"impl": reference, "pt": [self._auto_class], "type": registered.get("type", "image")}}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` (missing weights initialised by `_init_weights` and listed in
        `output_loading_info=True`'s `missing_keys`; a size mismatch raises a RuntimeError unless
        `ignore_mismatched_sizes=True`), with checks that name what is wrong:

        - corrupt or truncated weights raise an OSError, NaN / inf tensors a ValueError naming them;
        - reparameterized weights with a multi-branch config (or the reverse) raise a ValueError;
        - a config.json without a field that shapes the computation warns (the default would be used silently);
        - weights initialised rather than loaded warn (a `UserWarning`) with what was initialised and what was
          dropped: a partial CMSA checkpoint (backbone weights missing) or another task's checkpoint;
        - weights named as earlier versions named them load under the current names (`legacy_weight_names`).
        """
        if cls.legacy_weight_names:
            kwargs.setdefault("key_mapping", cls.legacy_weight_names)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if pretrained_model_name_or_path is not None and kwargs.get("config") is None:
            _warn_missing_config_fields(pretrained_model_name_or_path, kwargs)
        try:
            # Mismatches are raised below, naming the tensors (transformers' own error points at a logged report).
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, ignore_mismatched_sizes=True, output_loading_info=True,
                **kwargs,
            )  # fmt: skip
        except SafetensorError as error:
            raise OSError(f"The weights in {pretrained_model_name_or_path} are corrupt or truncated: {error}") from error
        if kwargs.get("key_mapping") is cls.legacy_weight_names:  # save under the current names, not the loaded ones
            model._weight_conversions = [
                conversion for conversion in getattr(model, "_weight_conversions", None) or []
                if getattr(conversion, "_original_source_patterns", None) is None
                or not set(conversion._original_source_patterns) <= set(cls.legacy_weight_names)
            ]  # fmt: skip
        source = pretrained_model_name_or_path if pretrained_model_name_or_path is not None else "the state_dict"
        _check_weight_form(model, info["unexpected_keys"], source)
        if info["mismatched_keys"] and not ignore_mismatched_sizes:
            mismatched = [
                f"{key}: checkpoint {tuple(checkpoint_shape)} vs model {tuple(model_shape)}"
                for key, checkpoint_shape, model_shape in sorted(info["mismatched_keys"])
            ]
            raise RuntimeError(
                f"The weights in {source} do not fit the config ({len(mismatched)} tensors):\n  {_shown(mismatched)}\n"
                "Check that config.json belongs to these weights; pass ignore_mismatched_sizes=True to re-initialise "
                "them (a new label count, for example)."
            )
        _check_finite(model, {key for key, _, _ in info["mismatched_keys"]} | set(info["missing_keys"]), source)
        if not (pretrained_model_name_or_path is None and kwargs.get("state_dict") == {}):  # unless asked for
            _warn_initialised_weights(model, info, source)
        return (model, info) if output_loading_info else model

    def no_weight_decay(self) -> set[str]:
        """The names of the parameters trained without weight decay (timm's convention): `no_weight_decay_names`."""
        return no_weight_decay_names(self)

    def _add_backbone_and_head(self, config: CMSAConfig):
        """`self.cmsa` (with the fusion layer when the head reads the fused map) and `self.head`, the config's head of
        the model's task (`TASK_HEADS[self.pipeline_task]`)."""
        head = head_class(config, self.pipeline_task)
        self.cmsa = CMSAModel(config, add_fusion_layer=head.reads == "fused")
        self.head = head(config)

    def _run_head(self, pixel_values, flip_test: bool, output_attentions, output_hidden_states):
        """Backbone (`self.cmsa`) -> `self.head`; with `flip_test` also the mirrored input, averaged in by
        `flip_test_average`. Returns (the head's outputs, the stage outputs when asked (argument, else config),
        the attentions when asked), the last two those of the input itself."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        needs_stages = self.head.reads == "stages"
        outputs = self.cmsa(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states or needs_stages,
            return_dict=True,
        )  # fmt: skip
        head_outputs = self.head(self.head.features(outputs))
        if flip_test:
            mirrored = self.cmsa(pixel_values.flip(-1), output_attentions=False, output_hidden_states=needs_stages, return_dict=True)
            head_outputs = flip_test_average(self.head, head_outputs, self.head(self.head.features(mirrored)))
        return head_outputs, (outputs.hidden_states if output_hidden_states else None), outputs.attentions

    def reparameterize(self) -> "CMSAPreTrainedModel":
        """Fold the multi-branch convolutions and conv + BN pairs for inference (in place, idempotent).

        The result is inference-only: it saves with `config.reparameterized = True`, reloads in that form, and
        refuses a training-mode forward (fine-tune the multi-branch checkpoint instead).
        """
        return reparameterize_model(self)


class CMSAModel(CMSAPreTrainedModel):
    """Stem -> stages -> multi-stage fusion.

    Returns `last_hidden_state` = the fused map (batch, sum C, H1, W1) at stage-1 resolution, `pooler_output` =
    its spatial mean (batch, sum C), `hidden_states` = the stage outputs (batch, C_i, H1 / 2^i, W1 / 2^i), one per
    stage (the stem is part of stage 1, so there is no separate embedding output), and `attentions`. With
    `add_fusion_layer=False` (heads that read the stages themselves) there is no fusion: `last_hidden_state` is
    the last stage's output and `pooler_output` its spatial mean. By default the fusion is built unless the config
    comes from a head-pose checkpoint (`architectures`), whose backbone has none.

    `attentions` (`output_attentions=True` with `attn_implementation="eager"`; SDPA computes no weights, warns and
    returns None): a tuple with one entry per CMSA block, stage by stage (`sum(config.depths)` entries). A block's
    entry is one tensor (batch, windows, heads, Nq, Nkv) of softmax weights, the heads of its groups concatenated,
    when all its attention groups have the same windows and key / value pooling; otherwise a tuple with one such
    tensor per group, in cascade order. `windows` counts the group's windows on the stage map (row-major), Nq is
    the window's positions (window height x width, row-major) and Nkv those of the window pooled by the group's
    `kv_pool_ratios`.

    `pixel_values` (batch, num_channels, *image_size) in the weights' dtype are checked by `check_pixel_values`;
    NaN / inf pixels are refused in training mode only: in eval mode they make that image's outputs NaN, the other
    images of the batch keep theirs. Unknown keyword arguments are a TypeError (`check_forward_kwargs`).
    """

    def __init__(self, config: CMSAConfig, add_fusion_layer: bool | None = None):
        super().__init__(config)
        if add_fusion_layer is None:  # the backbone of a head-pose checkpoint (AutoModel) has no fusion weights
            add_fusion_layer = (config.architectures or [None])[0] != "CMSAForHeadPoseEstimation"
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        bounds = [sum(config.depths[:i]) for i in range(config.num_stages + 1)]
        self.stages = nn.ModuleList(
            CMSAStage(config, stage, rates[bounds[stage] : bounds[stage + 1]]) for stage in range(config.num_stages)
        )
        self.fusion = CMSAMultiScaleFusion(config) if add_fusion_layer else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = self._wants_attentions(output_attentions)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        check_forward_kwargs(self, kwargs)
        check_pixel_values(pixel_values, self.config, self.dtype, self.training)
        if self.training and self.config.reparameterized:
            raise RuntimeError(
                "This CMSA model is reparameterized (inference-only): its BatchNorms are folded away. Call "
                "model.eval() for inference, or fine-tune the multi-branch (not reparameterized) checkpoint."
            )

        hidden_states, stage_outputs, attentions = pixel_values, [], []
        for stage in self.stages:
            hidden_states, stage_attentions = stage(hidden_states, output_attentions)
            stage_outputs.append(hidden_states)
            attentions += stage_attentions
        fused = self.fusion(stage_outputs) if self.fusion is not None else hidden_states
        pooled = spatial_mean(fused)
        all_hidden_states = tuple(stage_outputs) if output_hidden_states else None
        all_attentions = tuple(attentions) if output_attentions else None

        if not return_dict:
            return tuple(value for value in (fused, pooled, all_hidden_states, all_attentions) if value is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=fused, pooler_output=pooled, hidden_states=all_hidden_states, attentions=all_attentions
        )


class CMSAForImageClassification(CMSAPreTrainedModel):
    """CMSAModel -> `CMSAClassificationHead` (fusion neck -> global average pool -> dropout -> linear)."""

    extra_auto_classes = {"AutoModel": "CMSAModel"}
    pipeline_task = "image-classification"
    # Checkpoints saved before the head became a module (`CMSAClassificationHead`) name its weights without `head.`.
    legacy_weight_names = {r"^neck\.": "head.neck.", r"^classifier\.": "head.classifier."}

    def __init__(self, config: CMSAConfig):
        if config.num_labels < 1:
            raise ValueError(
                f"CMSAForImageClassification needs num_labels >= 1, got {config.num_labels} (for features without a classifier use "
                "CMSAModel and its pooler_output)"
            )
        super().__init__(config)
        self.num_labels = config.num_labels
        self._add_backbone_and_head(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        flip_test: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """labels: (batch,) integer class indices (-100 is ignored), or for `config.problem_type`
        "multi_label_classification" / "regression" float targets (batch, num_labels) ((batch,) for one label).
        With `problem_type` unset, transformers infers it from the first labels (integer: single-label, float:
        multi-label, num_labels == 1: regression) and keeps it; `_check_labels` lists what each type takes.
        flip_test: also classify the mirrored images and average the logits.
        Returns `hidden_states` and `attentions` as `CMSAModel` does (those of the unflipped images)."""
        check_forward_kwargs(self, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        head_outputs, hidden_states, attentions = self._run_head(
            pixel_values, flip_test, output_attentions, output_hidden_states
        )
        logits = head_outputs["logits"]

        loss = None
        if labels is not None:
            self._check_labels(labels, logits.shape[0])
            loss = self.head.loss(logits=logits, labels=labels)

        if not return_dict:
            output = tuple(v for v in (logits, hidden_states, attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    def _check_labels(self, labels: torch.Tensor, batch_size: int):
        """Labels must fit `config.problem_type` (or, unset, the type transformers will infer from them):
        single-label: integer (int64 / int32) class indices (batch,) in [0, num_labels) or -100, not all -100;
        multi-label: float (batch, num_labels); regression: float (batch, num_labels), or (batch,) for one label."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(
                f"labels must be a torch.Tensor, got a {type(labels).__name__}: use torch.tensor(labels) "
                "(integer class indices of shape (batch,))"
            )
        shape, num_labels = tuple(labels.shape), self.num_labels
        if not shape or shape[0] != batch_size:
            raise ValueError(f"labels has shape {shape} for a batch of {batch_size} images: expected {batch_size} rows")
        problem_type = self.config.problem_type
        if problem_type is None:
            if num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            elif labels.is_floating_point() and shape == (batch_size, num_labels):
                problem_type = "multi_label_classification"
            else:
                raise ValueError(
                    f"labels of dtype {labels.dtype} and shape {shape} fit no problem type (config.problem_type is "
                    f"unset): class indices must be int64 of shape ({batch_size},) (labels.long()); multi-label "
                    f"targets float of shape ({batch_size}, {num_labels}); or set config.problem_type"
                )
        # transformers sets config.problem_type from the first labels it sees when it is unset, and keeps it.
        origin = (
            f"config.problem_type is {problem_type!r} (set in the config, or inferred by transformers from the "
            "first labels this model was given and kept since)"
        )
        if problem_type == "single_label_classification":
            if labels.dtype not in (torch.long, torch.int):
                raise ValueError(
                    f"{origin}: labels must be integer class indices (int64), got dtype {labels.dtype} "
                    "(float class ids: labels.long())"
                )
            if labels.dim() != 1:
                raise ValueError(f"{origin}: labels must have shape ({batch_size},) (one class index per image), got {shape}")
            valid = labels[labels != -100]
            if not valid.numel():
                raise ValueError("every label of the batch is the ignore index -100: the loss would be NaN")
            if valid.min() < 0 or valid.max() >= num_labels:
                raise ValueError(
                    f"labels must be class indices in [0, {num_labels}) (num_labels={num_labels}), "
                    f"got values from {int(valid.min())} to {int(valid.max())}"
                )
        elif problem_type in ("multi_label_classification", "regression"):
            expected = [(batch_size, num_labels)] + ([(batch_size,)] if problem_type == "regression" and num_labels == 1 else [])
            if not labels.is_floating_point() or shape not in expected:
                raise ValueError(
                    f"{origin}: labels must be float targets of shape {' or '.join(map(str, expected))}, "
                    f"got dtype {labels.dtype} and shape {shape}"
                )


@dataclass
class CMSAKeypointDetectionOutput(ModelOutput):
    """
    loss: 0.5 * MSE between heatmaps and targets, weighted per keypoint (when targets are given).
    heatmaps: (batch, num_keypoints, H1, W1), one per keypoint at stage-1 resolution.
    hidden_states: the stage outputs, when asked.
    attentions: the attention weights, one entry per block (a tensor (batch, windows, heads, Nq, Nkv), or a tuple
        of one per attention group when the groups differ in shape), when asked: see `CMSAModel`.
    """

    loss: torch.FloatTensor | None = None
    heatmaps: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor | tuple[torch.FloatTensor, ...], ...] | None = None


class CMSAHeatmapHead(CMSAHead):
    """The authors' fusion head: fusion neck -> Conv1x1 + BN to one heatmap per keypoint. Owns its loss; mirrored
    heatmaps are flipped back with the left / right keypoints of `config.flip_pairs` swapped.

    Shapes: fused (batch, sum C, H1, W1) -> heatmaps (batch, num_keypoints, H1, W1).
    """

    def __init__(self, config: CMSAConfig):
        super().__init__()
        self.flip_pairs = [tuple(pair) for pair in config.flip_pairs]
        self.neck = CMSAFusionNeck(config)
        self.heatmaps = CMSAConvBN(
            self.neck.hidden_size, config.num_keypoints, eps=config.batch_norm_eps, inference_mode=config.reparameterized
        )
        if isinstance(self.heatmaps.bn, nn.BatchNorm2d):
            self.heatmaps.bn.is_heatmap_output = True  # initialised at config.heatmap_init_scale

    def forward(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"heatmaps": self.heatmaps(self.neck(fused))}

    def mirror(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"heatmaps": flip_heatmaps_back(outputs["heatmaps"], self.flip_pairs)}

    @staticmethod
    def loss(
        heatmaps: torch.Tensor, target_heatmaps: torch.Tensor, target_weights: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """0.5 * mean squared error, each keypoint weighted (0 for unlabelled / invisible ones), as in HRNet.
        `reduction="none"` gives one value per sample (batch,), whose mean is the "mean" loss."""
        if target_heatmaps.shape != heatmaps.shape:
            raise ValueError(
                f"target_heatmaps must have the heatmaps' shape {tuple(heatmaps.shape)}, got {tuple(target_heatmaps.shape)}"
            )
        if target_weights.shape != heatmaps.shape[:2]:
            raise ValueError(
                f"target_weights must have shape (batch, num_keypoints) = {tuple(heatmaps.shape[:2])}, "
                f"got {tuple(target_weights.shape)}"
            )
        squared = (heatmaps.float() - target_heatmaps.float()) ** 2
        per_sample = 0.5 * (squared * target_weights.float()[..., None, None]).mean(dim=(1, 2, 3))
        return per_sample if reduction == "none" else per_sample.mean()


class CMSAForKeypointDetection(CMSAPreTrainedModel):
    """Top-down human pose: CMSAModel -> heatmap head, one heatmap per keypoint of `config.keypoint_names` at the
    stage-1 resolution (32x24 for 32x24 crops). Decode them with `HeatmapCodec` or the keypoint image processor."""

    extra_auto_classes = {"AutoModel": "CMSAModel", "AutoModelForPoseEstimation": "CMSAForKeypointDetection"}
    pipeline_task = "keypoint-detection"

    def __init__(self, config: CMSAConfig):
        super().__init__(config)
        self._add_backbone_and_head(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        target_heatmaps: torch.Tensor | None = None,
        target_weights: torch.Tensor | None = None,
        flip_test: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CMSAKeypointDetectionOutput | tuple:
        """
        target_heatmaps: (batch, num_keypoints, H1, W1) Gaussian targets (`HeatmapCodec.encode`).
        target_weights: (batch, num_keypoints); defaults to ones.
        flip_test: also run the mirrored crops and average their heatmaps, flipped back with left / right swapped
            (`hidden_states` and `attentions` are those of the unflipped crops).
        """
        check_forward_kwargs(self, kwargs)
        if target_weights is not None and target_heatmaps is None:
            raise ValueError("target_weights was given without target_heatmaps: the loss needs both (weights default to 1)")
        for name, value in (("target_heatmaps", target_heatmaps), ("target_weights", target_weights)):
            check_finite_targets(name, value)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        head_outputs, hidden_states, attentions = self._run_head(
            pixel_values, flip_test, output_attentions, output_hidden_states
        )
        heatmaps = head_outputs["heatmaps"]

        loss = None
        if target_heatmaps is not None:
            if target_weights is None:
                target_weights = torch.ones(heatmaps.shape[:2], device=heatmaps.device)
            loss = self.head.loss(heatmaps=heatmaps, target_heatmaps=target_heatmaps, target_weights=target_weights)

        if not return_dict:
            output = tuple(v for v in (heatmaps, hidden_states, attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CMSAKeypointDetectionOutput(
            loss=loss, heatmaps=heatmaps, hidden_states=hidden_states, attentions=attentions
        )


@dataclass
class CMSAHeadPoseOutput(ModelOutput):
    """
    loss: the head's loss against `labels` (when given).
    angles: (batch, 3) yaw, pitch, roll in degrees.
    logits: (batch, 3, bins) per-angle bin logits (binned head only).
    hidden_states: the stage outputs, when asked.
    attentions: the attention weights, one entry per block (a tensor (batch, windows, heads, Nq, Nkv), or a tuple
        of one per attention group when the groups differ in shape), when asked: see `CMSAModel`.
    """

    loss: torch.FloatTensor | None = None
    angles: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor | tuple[torch.FloatTensor, ...], ...] | None = None


class CMSABinnedAngleHead(CMSAHead):
    """The Hopenet form: the pooled last stage -> one linear classifier over angle bins per angle; the angle is the
    expectation over the bin centres. Owns its loss: cross-entropy on the bins + alpha * MSE of the expected angle.

    Shapes: stage outputs [(batch, C_i, H_i, W_i)] -> logits (batch, 3, bins), angles (batch, 3).
    """

    reads = "stages"

    def __init__(self, config: CMSAConfig):
        super().__init__()
        self.codec = AngleBinCodec(config.head_pose_bins, config.head_pose_bin_width)
        self.regression_weight = config.head_pose_regression_weight
        self.classifier = nn.Linear(config.hidden_sizes[-1], 3 * config.head_pose_bins)

    def forward(self, stage_outputs) -> dict[str, torch.Tensor]:
        pooled = spatial_mean(stage_outputs[-1])
        logits = self.classifier(pooled).view(pooled.shape[0], 3, self.codec.num_bins)
        return {"logits": logits, "angles": self.codec.decode(logits)}

    def loss(self, logits: torch.Tensor, angles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed over the three angles, averaged over the batch (degrees for the MSE)."""
        bins = self.codec.encode(labels)
        cross_entropy = F.cross_entropy(logits.float().flatten(0, 1), bins.flatten(), reduction="none").view_as(labels)
        squared = (angles.float() - labels.float()) ** 2
        return (cross_entropy + self.regression_weight * squared).sum(dim=1).mean()

    @staticmethod
    def mirror_logits(logits: torch.Tensor) -> torch.Tensor:
        """The logits of the mirrored face: bins are symmetric about 0, so yaw and roll reverse their bins."""
        return torch.stack([logits[:, 0].flip(-1), logits[:, 1], logits[:, 2].flip(-1)], dim=1)

    def mirror(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.mirror_logits(outputs["logits"]), "angles": mirror_angles(outputs["angles"])}


class CMSASoftStagewiseHead(CMSAHead):
    """FSA-Net's soft stage-wise regression (SSR, Yang et al. 2018/2019) over the three pooled stages, deepest
    first: stage k predicts for each angle a distribution over `s_k` bins (ReLU), a shift of the bin centres
    (tanh) and a dynamic range (tanh); the angle is V * sum_k sum_i p_k,i (i - s_k // 2 + shift_k) /
    prod_{j<=k} s_j (1 + lambda * range_j), with V half the angle range (99). L1 loss. A few thousand weights.

    lambda (SSR-Net's lambda_local) is 0.5 rather than FSA-Net's 1: with 1 a saturated tanh zeroes a denominator.

    Shapes: stage outputs [(batch, C_i, H_i, W_i)] -> angles (batch, 3).
    """

    reads = "stages"
    dynamic_range_weight = 0.5

    def __init__(self, config: CMSAConfig):
        super().__init__()
        self.stage_bins = list(config.ssr_stage_bins)
        self.half_range = config.head_pose_max_angle
        channels = list(reversed(config.hidden_sizes))
        self.distributions = nn.ModuleList(nn.Linear(c, 3 * s) for c, s in zip(channels, self.stage_bins))
        self.shifts = nn.ModuleList(nn.Linear(c, 3) for c in channels)
        self.ranges = nn.ModuleList(nn.Linear(c, 3) for c in channels)

    def forward(self, stage_outputs) -> dict[str, torch.Tensor]:
        angle, denominator = 0.0, 1.0
        for index, features in enumerate(reversed(stage_outputs)):
            pooled = spatial_mean(features)
            bins = self.stage_bins[index]
            probabilities = F.relu(self.distributions[index](pooled)).view(pooled.shape[0], 3, bins)
            shift = torch.tanh(self.shifts[index](pooled))
            dynamic_range = torch.tanh(self.ranges[index](pooled))
            denominator = denominator * bins * (1 + self.dynamic_range_weight * dynamic_range)
            centres = torch.arange(bins, device=pooled.device, dtype=pooled.dtype) - bins // 2
            angle = angle + (probabilities * (centres + shift.unsqueeze(-1))).sum(dim=-1) / denominator
        return {"angles": angle * self.half_range}

    def loss(self, angles: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean absolute error in degrees, summed over the three angles."""
        return (angles.float() - labels.float()).abs().sum(dim=1).mean()

    def mirror(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"angles": mirror_angles(outputs["angles"])}


class CMSAForHeadPoseEstimation(CMSAPreTrainedModel):
    """Landmark-free head pose from a face crop: CMSAModel (no fusion) -> angle head (`config.head_pose_head`: the
    paper's SSR head by default, or the binned one). Angles in degrees, order (yaw, pitch, roll), the 300W-LP sign
    convention (`cmsa_hf.codecs`)."""

    pipeline_task = "head-pose-estimation"  # exported under AutoModel: transformers has no head-pose Auto class

    def __init__(self, config: CMSAConfig):
        super().__init__(config)
        self._add_backbone_and_head(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        flip_test: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CMSAHeadPoseOutput | tuple:
        """
        labels: (batch, 3) yaw, pitch, roll in degrees.
        flip_test: also run the mirrored faces and average, their yaw and roll negated (bins reversed): the
            prediction then mirrors exactly with the face (`hidden_states` and `attentions`: the unflipped faces').
        """
        check_forward_kwargs(self, kwargs)
        if labels is not None:
            self._check_labels(labels)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        head_outputs, hidden_states, attentions = self._run_head(
            pixel_values, flip_test, output_attentions, output_hidden_states
        )
        angles, logits = head_outputs["angles"], head_outputs.get("logits")

        loss = None
        if labels is not None:
            if labels.shape != angles.shape:
                raise ValueError(
                    f"labels must be (batch, 3) = {tuple(angles.shape)} yaw, pitch, roll in degrees, got {tuple(labels.shape)}"
                )
            loss = self.head.loss(**head_outputs, labels=labels)

        if not return_dict:
            output = tuple(v for v in (angles, logits, hidden_states, attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CMSAHeadPoseOutput(
            loss=loss, angles=angles, logits=logits, hidden_states=hidden_states, attentions=attentions
        )

    def _check_labels(self, labels: torch.Tensor):
        """Finite angles in degrees within the range the heads can express (+-config.head_pose_max_angle)."""
        check_finite_targets("labels", labels)
        limit = self.config.head_pose_max_angle
        beyond = (labels.abs() > limit).any(dim=-1).nonzero().flatten().tolist() if labels.dim() == 2 else []
        if beyond:
            raise ValueError(
                f"labels of samples {beyond[:10]} lie outside [-{limit:g}, {limit:g}] degrees, the range of the angle "
                f"bins (head_pose_bins={self.config.head_pose_bins} x head_pose_bin_width="
                f"{self.config.head_pose_bin_width:g}): drop such faces (as the AFLW2000 protocol does) or widen the bins"
            )


__all__ = [
    "CMSAPreTrainedModel",
    "CMSAModel",
    "CMSAForImageClassification",
    "CMSAForKeypointDetection",
    "CMSAKeypointDetectionOutput",
    "CMSAForHeadPoseEstimation",
    "CMSAHeadPoseOutput",
    "reparameterize_model",
    "no_weight_decay_names",
]
