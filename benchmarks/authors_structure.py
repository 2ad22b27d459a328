"""The authors' released structure of CMSA, as a benchmark peer: a plain PyTorch module with their layout.

Re-implemented from ../shared/reference/ARCHITECTURE.md and the paper (not copied): module and parameter names follow
the authors' checkpoints (`cmsa_s_32x24_random_init.pth` loads with strict=True), separate q and kv convolutions,
BatchNorm after every conv branch, the attention run window by window in Python loops, the bias gathered from
their stored `attention_bias_idxs`, a Linear output projection over tokens, and no reparameterization. It is the
baseline that `benchmarks/inference.py` divides our fastest path by.

    model = AuthorsStructureCMSA.from_config(CMSAConfig.from_variant("cmsa-s", image_size=(32, 24)), num_outputs=17)
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Sequential):
    """`conv` then `bn` (their `conv_bn`)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_channels))


class MultiBranchConv(nn.Module):
    """Their MobileOne-style block, unfolded: `rbr_conv.0` (kxk + BN), `rbr_scale` (1x1 + BN, k > 1),
    `rbr_skip` (BN, equal channels and stride 1), summed, then the activation."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, activation=True):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList([ConvBN(in_channels, out_channels, kernel_size, stride, groups)])
        self.rbr_scale = ConvBN(in_channels, out_channels, 1, stride, groups) if kernel_size > 1 else None
        self.activation = nn.GELU() if activation else nn.Identity()

    def forward(self, x):
        out = self.rbr_conv[0](x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(out)


class Embedding(nn.Module):
    """Depthwise 3x3 multi-branch conv (+ GELU), then pointwise 1x1 multi-branch conv (+ GELU in the stem)."""

    def __init__(self, in_channels, out_channels, stride, activate_output):
        super().__init__()
        self.rep_dwconv = MultiBranchConv(in_channels, in_channels, 3, stride, groups=in_channels)
        self.rep_pwconv = MultiBranchConv(in_channels, out_channels, 1, activation=activate_output)

    def forward(self, x):
        return self.rep_pwconv(self.rep_dwconv(x))


class Stem(nn.Module):
    def __init__(self, in_channels, width):
        super().__init__()
        self.embedding1 = Embedding(in_channels, width // 2, 1, True)
        self.embedding2 = Embedding(width // 2, width, 1, True)

    def forward(self, x):
        return self.embedding2(self.embedding1(x))


class SpatialFusion(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.dwconv_bn = ConvBN(channels, channels, 3, groups=channels)
        self.pwconv_bn = ConvBN(channels, channels)

    def forward(self, x):
        return self.pwconv_bn(F.gelu(x + self.dwconv_bn(x)))


class WindowAttention(nn.Module):
    """One head group: a Python loop over the windows, the bias gathered per call from `attention_bias_idxs`."""

    def __init__(self, num_heads, key_dim, value_dim, window, kv_window):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.window, self.kv_window = window, kv_window
        offsets, index = {}, []
        for qy in range(window[0]):
            for qx in range(window[1]):
                for ky in range(kv_window[0]):
                    for kx in range(kv_window[1]):
                        index.append(offsets.setdefault((abs(qy - ky), abs(qx - kx)), len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        queries, keys = window[0] * window[1], kv_window[0] * kv_window[1]
        self.register_buffer("attention_bias_idxs", torch.tensor(index).view(queries, keys))

    def forward(self, q, kv):
        """q (B, h * kd, H, W), kv (B, h * (kd + d), H / r, W / r) -> (B, h * d, H, W)."""
        batch, _, height, width = q.shape
        (wh, ww), (kh, kw) = self.window, self.kv_window
        bias = self.attention_biases[:, self.attention_bias_idxs]
        out = q.new_zeros(batch, self.num_heads * self.value_dim, height, width)
        for row in range(height // wh):
            for col in range(width // ww):
                q_window = q[:, :, row * wh : (row + 1) * wh, col * ww : (col + 1) * ww]
                kv_window = kv[:, :, row * kh : (row + 1) * kh, col * kw : (col + 1) * kw]
                q_tokens = q_window.flatten(2).view(batch, self.num_heads, self.key_dim, -1).transpose(2, 3)
                kv_tokens = kv_window.flatten(2).view(batch, self.num_heads, self.key_dim + self.value_dim, -1)
                k, v = kv_tokens.split([self.key_dim, self.value_dim], dim=2)
                attn = (q_tokens @ k) * self.key_dim**-0.5 + bias
                context = attn.softmax(dim=-1) @ v.transpose(2, 3)  # (B, h, wh * ww, d)
                context = context.transpose(2, 3).reshape(batch, self.num_heads * self.value_dim, wh, ww)
                out[:, :, row * wh : (row + 1) * wh, col * ww : (col + 1) * ww] = context
        return out


class CascadedAttention(nn.Module):
    def __init__(self, dim, heads, key_dim, value_dim, windows, pool_ratios):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.q = nn.Conv2d(dim, key_dim * sum(heads), 1)
        self.kv = nn.Conv2d(dim, (key_dim + value_dim) * sum(heads), 1)
        kv_channels = [(key_dim + value_dim) * h for h in heads]
        self.channel_fusion_modules = nn.ModuleList(
            ConvBN(kv_channels[k] + heads[k - 1] * value_dim, kv_channels[k]) for k in range(1, len(heads))
        )
        self.spatial_fusion_modules = nn.ModuleList(SpatialFusion(c) for c in kv_channels)
        self.pool_ratios = pool_ratios
        self.attn_modules = nn.ModuleList(
            WindowAttention(h, key_dim, value_dim, tuple(w), (w[0] // r, w[1] // r))
            for h, w, r in zip(heads, windows, pool_ratios)
        )
        self.linear = nn.Linear(value_dim * sum(heads), dim)

    def forward(self, x):
        queries = self.q(x).split([self.key_dim * h for h in self.heads], dim=1)
        key_values = self.kv(x).split([(self.key_dim + self.value_dim) * h for h in self.heads], dim=1)
        outputs = []
        for group, (q, kv) in enumerate(zip(queries, key_values)):
            if group > 0:
                kv = self.channel_fusion_modules[group - 1](torch.cat([kv, outputs[-1]], dim=1))
            kv = self.spatial_fusion_modules[group](kv)
            if self.pool_ratios[group] > 1:
                kv = F.avg_pool2d(kv, self.pool_ratios[group])
            outputs.append(self.attn_modules[group](q, kv))
        tokens = torch.cat(outputs, dim=1).permute(0, 2, 3, 1)
        return self.linear(tokens).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim * ratio), nn.Linear(dim * ratio, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, key_dim, value_dim, windows, pool_ratios, mlp_ratio):
        super().__init__()
        self.pos_embed = MultiBranchConv(dim, dim, 3, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = CascadedAttention(dim, heads, key_dim, value_dim, windows, pool_ratios)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x):
        x = self.pos_embed(x)
        x = x + self.attn(self.norm1(x))
        tokens = x.permute(0, 2, 3, 1)
        return (tokens + self.mlp(self.norm2(tokens))).permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        for index, block in enumerate(blocks):
            self.add_module(f"trains_block{index}", block)

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class FusionHead(nn.Module):
    """Their `fgmm`: depthwise transposed-conv upsampling + BN of stages 2 and 3, concat, Conv-BN, GELU, Conv-BN
    (`norm0`, a BN on stage 1 that their forward never uses, is kept for the checkpoint's keys)."""

    def __init__(self, dims, num_outputs):
        super().__init__()
        self.norm0 = nn.BatchNorm2d(dims[0])
        self.convTrans1 = nn.ConvTranspose2d(dims[1], dims[1], 2, stride=2, groups=dims[1])
        self.norm1 = nn.BatchNorm2d(dims[1])
        self.convTrans2 = nn.ConvTranspose2d(dims[2], dims[2], 4, stride=4, groups=dims[2])
        self.norm2 = nn.BatchNorm2d(dims[2])
        total = sum(dims)
        self.csMixer = nn.Sequential(ConvBN(total, total // 2), nn.GELU(), ConvBN(total // 2, num_outputs))

    def forward(self, s1, s2, s3):
        fused = torch.cat([s1, self.norm1(self.convTrans1(s2)), self.norm2(self.convTrans2(s3))], dim=1)
        return self.csMixer(fused)


class AuthorsStructureCMSA(nn.Module):
    """Stem (also kept as `embedding_blocks.0`, as their checkpoints hold it twice), three stages with a stride-2
    embedding before stages 2 and 3, the fusion head. (B, 3, H, W) -> (B, num_outputs, H, W)."""

    def __init__(self, dims, depths, heads, windows, pool_ratios, num_outputs, key_dim=16, value_dim=32, mlp_ratio=4):
        super().__init__()
        self.stem = Stem(3, dims[0])
        self.embedding_blocks = nn.ModuleList(
            [self.stem, *(Embedding(dims[i - 1], dims[i], 2, False) for i in (1, 2))]
        )
        self.stage_blocks = nn.ModuleList(
            Stage([Block(dims[i], heads[i], key_dim, value_dim, windows[i], pool_ratios[i], mlp_ratio) for _ in range(depths[i])])
            for i in range(3)
        )
        self.fgmm = FusionHead(dims, num_outputs)

    @classmethod
    def from_config(cls, config, num_outputs: int):
        """The authors' layout of a `CMSAConfig` (its widths, depths, heads, windows and pool ratios)."""
        if config.stem_stride != 1:
            raise ValueError("the authors' structure has a stride-1 stem; this config's stem has stride 2")
        windows = [config.window_sizes(stage) for stage in range(3)]
        return cls(config.hidden_sizes, config.depths, config.num_heads, windows, config.kv_pool_ratios, num_outputs,
                   config.key_dim, config.value_dim, config.mlp_ratio)  # fmt: skip

    def forward(self, pixel_values):
        x, outputs = pixel_values, []
        for embedding, stage in zip(self.embedding_blocks, self.stage_blocks):
            x = stage(embedding(x))
            outputs.append(x)
        return self.fgmm(*outputs)
