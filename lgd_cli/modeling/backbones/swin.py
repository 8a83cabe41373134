"""Swin Transformer (Liu et al. 2021) as a detectron2 Backbone, with the two FPN builders of the reference.

Our own implementation rather than torchvision's `swin_t` feature stages, because:
1. Key layout: the module names follow the official checkpoint (`patch_embed.proj`,
   `layers.N.blocks.M.attn.qkv`, `layers.N.downsample.reduction`, ...), so official ImageNet
   weights and the reference's detection checkpoints map 1:1 (`backbone.bottom_up.` + key);
   torchvision's `features.N.M...` names would need a second rename table.
2. Any input size: windows are padded per block and the shifted-window mask is rebuilt for the
   padded size of each input (never stored), like the official detection code. torchvision also
   pads, but drops the shift when one window covers the whole padded map, which the official
   model (and so the reference) does not: its small-image outputs would differ.
3. Buffers: `relative_position_index` is rebuilt, not persistent (the official checkpoint stores it,
   torchvision too), so the converted file holds learnable tensors only.
4. Config: every MODEL.SWINT value (embed dim, depths, heads, window, MLP ratio, drop-path) is
   taken as given, not only the Tiny preset. Drop-path is torchvision's StochasticDepth ("row").
torchvision's implementation serves in the tests as the independent reference for our outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from lgd_cli.errors import ConfigError

# Logit added where a shifted window joins regions that are not neighbours in the image (as official).
_MASKED = -100.0


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, Hp, Wp, C) with Hp, Wp multiples of `window` -> (B·nW, window², C), windows row-major."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_merge(windows: Tensor, window: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of window_partition: (B·nW, window², C) -> (B, Hp, Wp, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, Hp // window, Wp // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)


def shifted_window_mask(Hp: int, Wp: int, window: int, shift: int, device=None, dtype=torch.float32) -> Tensor:
    """Additive attention mask (nW, window², window²) for windows of a map rolled by -shift.

    After the roll, the last `window` rows hold three bands that were apart in the image: the
    rows before Hp - window, those up to Hp - shift, and the `shift` rows wrapped around from the
    top (the same for columns). Two positions may attend to each other only within one band pair.
    """
    def bands(size: int) -> Tensor:
        i = torch.arange(size, device=device)
        return (i >= size - window).long() + (i >= size - shift).long()

    region = (bands(Hp)[:, None] * 3 + bands(Wp)[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
    region = window_partition(region, window).squeeze(-1)  # (nW, window²)
    apart = region[:, None, :] != region[:, :, None]
    return torch.zeros(apart.shape, device=device, dtype=dtype).masked_fill(apart, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows of window² tokens, with a learned relative position bias.

    Args:
        dim: channels C of the tokens.
        window: side of the square window.
        num_heads: heads; C must be divisible by it.
    """

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One bias per head and per relative offset (dy, dx) in [-(window-1), window-1]².
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Row of the table for each (query, key) pair of a window: recomputed, so not saved.
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        dy = rows[:, None] - rows[None, :] + window - 1
        dx = cols[:, None] - cols[None, :] + window - 1
        self.register_buffer("relative_position_index", dy * (2 * window - 1) + dx, persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B·nW, N, C) with N = window²; mask: (nW, N, N) additive, or None. Returns (B·nW, N, C)."""
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).view(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B·nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        attn = attn + bias.view(N, N, self.num_heads).permute(2, 0, 1)
        if mask is not None:
            nW = mask.shape[0]
            attn = (attn.view(Bw // nW, nW, self.num_heads, N, N) + mask[None, :, None]).view(Bw, self.num_heads, N, N)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention (shifted by `shift` when > 0) and MLP, each with a residual and drop-path.

    Args:
        dim, num_heads, window: see WindowAttention.
        shift: cyclic shift of the map before windowing (0 or window // 2).
        mlp_ratio: MLP hidden width / dim.
        drop_path: probability of dropping each residual branch per sample in training.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        assert 0 <= shift < window
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, H, W, C); mask: shifted_window_mask of the padded size (used when shift > 0)."""
        H, W = x.shape[1:3]
        w = self.window
        # 1. normalise, then pad right/bottom to whole windows (padding added after the norm, as official)
        y = F.pad(self.norm1(x), (0, 0, 0, (w - W % w) % w, 0, (w - H % w) % w))
        Hp, Wp = y.shape[1:3]
        # 2. roll so that the windows straddle the previous block's window borders
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        # 3. attend inside each window, then undo the partition, the roll and the padding
        y = self.attn(window_partition(y, w), mask if self.shift else None)
        y = window_merge(y, w, Hp, Wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y[:, :H, :W, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve H and W: concatenate each 2×2 neighbourhood (4C) and project it to 2C.

    The four positions are concatenated in the official order (row, col) = (0,0), (1,0), (0,1), (1,1).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); an odd side is zero-padded first."""
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then (except the last stage) a PatchMerging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_paths: list[float], downsample: bool, use_checkpoint: bool = False):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, drop_paths[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        mask = None
        if self.shift and len(self.blocks) > 1:  # one mask for every shifted block of this input size
            H, W = x.shape[1:3]
            w = self.window
            mask = shifted_window_mask(math.ceil(H / w) * w, math.ceil(W / w) * w, w, self.shift, x.device, x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed in backward, with
                # the same drop-path draws (the RNG state is replayed).
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch × patch convolution, then LayerNorm; the image is zero-padded to whole patches."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, ceil(H/patch), ceil(W/patch), embed_dim)."""
        p = self.patch
        x = F.pad(x, (0, (p - x.shape[-1] % p) % p, 0, (p - x.shape[-2] % p) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinTransformer(Backbone):
    """Swin Transformer trunk; stage i+2 (i = 0..) has stride 4·2^i and embed_dim·2^i channels.

    Each requested output stage is normalised by its own LayerNorm `norm{i}` (fresh in detection,
    as in the reference; the ImageNet model's final `norm` is not used).

    Args:
        in_chans: image channels.
        embed_dim: channels of stage2 (96 for Tiny).
        depths, num_heads: blocks and attention heads per stage.
        window: window side (7).
        mlp_ratio: MLP width / dim (4).
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over all blocks.
        out_features: names among stage2.. stage{len(depths)+1}.
        freeze_at: 0 or -1 nothing frozen; 1 the patch embedding; k >= 2 also stages 2..k (as
            detectron2's ResNet: stem, res2, ...). A frozen part gets no gradient and stays in eval mode.
        use_checkpoint: activation checkpointing per block in training (MODEL.SWINT.USE_CHECKPOINT):
            the same outputs and gradients for less memory and one more forward of each block.
    """

    def __init__(self, *, in_chans: int = 3, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
                 out_features=("stage2", "stage3", "stage4", "stage5"), freeze_at: int = 0, patch: int = 4,
                 use_checkpoint: bool = False):
        super().__init__()
        names = [f"stage{i + 2}" for i in range(len(depths))]
        assert len(depths) == len(num_heads) and set(out_features) <= set(names), (depths, num_heads, out_features)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch)
        n = sum(depths)
        drop_paths = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear in block index, as official
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(embed_dim * 2**i, depth, num_heads[i], window, mlp_ratio,
                                         drop_paths[start:start + depth], downsample=i < len(depths) - 1,
                                         use_checkpoint=use_checkpoint))
        self._out_features = [n for n in names if n in out_features]
        self._out_feature_channels = {n: embed_dim * 2**i for i, n in enumerate(names) if n in out_features}
        self._out_feature_strides = {n: patch * 2**i for i, n in enumerate(names) if n in out_features}
        for i, n in enumerate(names):
            if n in out_features:
                self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))
        self.apply(_init_weights)
        self._frozen = self._freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        # Any size works inside the trunk (it pads); FPN's top-down ×2 upsampling needs stage maps of
        # exactly halving sizes, which an input divisible by the largest stride guarantees.
        return self._out_feature_strides[self._out_features[-1]] if self._out_features else 32

    def _freeze(self, freeze_at: int) -> list[nn.Module]:
        frozen = ([self.patch_embed] if freeze_at >= 1 else []) + list(self.layers[:max(freeze_at - 1, 0)])
        for module in frozen:
            module.requires_grad_(False)
            module.eval()
        return frozen

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:  # no drop-path in frozen stages
            module.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, C_in, H, W) -> {stage name: (B, C_s, ceil(H / stride_s), ceil(W / stride_s))}."""
        x = self.patch_embed(x)
        outputs = {}
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            name = f"stage{i + 2}"
            if name in self._out_feature_channels:
                outputs[name] = getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous()
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


def _init_weights(module: nn.Module) -> None:
    # The official initialisation; ImageNet weights replace all but the detection-only norms.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_swint_backbone(cfg, input_shape: ShapeSpec) -> SwinTransformer:
    """The Swin trunk from MODEL.SWINT and MODEL.BACKBONE.FREEZE_AT (refusing what it cannot build)."""
    s = cfg.MODEL.SWINT
    if s.APE:
        raise ConfigError("MODEL.SWINT.APE=True (absolute position embedding) is not supported",
                          hint="every Swin row of the paper uses APE=False")
    depths, heads = list(s.DEPTHS), list(s.NUM_HEADS)
    names = [f"stage{i + 2}" for i in range(len(depths))]
    if len(depths) != len(heads):
        raise ConfigError(f"MODEL.SWINT.DEPTHS {depths} and NUM_HEADS {heads} must have the same length")
    for i, h in enumerate(heads):
        if (s.EMBED_DIM * 2**i) % h:
            raise ConfigError(f"MODEL.SWINT: stage{i + 2} has {s.EMBED_DIM * 2**i} channels, "
                              f"not divisible by its {h} heads")
    unknown = [n for n in s.OUT_FEATURES if n not in names]
    if unknown or not s.OUT_FEATURES:
        raise ConfigError(f"MODEL.SWINT.OUT_FEATURES {list(s.OUT_FEATURES)}: each must be one of {names}")
    return SwinTransformer(in_chans=input_shape.channels, embed_dim=s.EMBED_DIM, depths=depths, num_heads=heads,
                           window=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, drop_path_rate=s.DROP_PATH_RATE,
                           out_features=list(s.OUT_FEATURES), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
                           use_checkpoint=s.USE_CHECKPOINT)


def _fpn_inputs(cfg, bottom_up: SwinTransformer) -> list[str]:
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [n for n in in_features if n not in bottom_up.output_shape()]
    if missing or not in_features:
        raise ConfigError(f"MODEL.FPN.IN_FEATURES {in_features} must be among MODEL.SWINT.OUT_FEATURES "
                          f"{list(cfg.MODEL.SWINT.OUT_FEATURES)}", hint="e.g. [stage3, stage4, stage5] for RetinaNet")
    return in_features


@BACKBONE_REGISTRY.register()
def build_swint_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Swin + FPN over MODEL.FPN.IN_FEATURES, p6 = max-pool of the top level (Mask R-CNN: p2-p6)."""
    bottom_up = build_swint_backbone(cfg, input_shape)
    return FPN(bottom_up=bottom_up, in_features=_fpn_inputs(cfg, bottom_up), out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_retinanet_swint_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Swin + FPN over MODEL.FPN.IN_FEATURES (stage3-5), p6/p7 by stride-2 convs from p5 (RetinaNet: p3-p7).

    p6 is computed from p5, not from the stage5 map, as the reference's Swin builder does.
    """
    bottom_up = build_swint_backbone(cfg, input_shape)
    in_features = _fpn_inputs(cfg, bottom_up)
    if bottom_up.output_shape()[in_features[-1]].stride != 32:
        raise ConfigError(f"MODEL.FPN.IN_FEATURES {in_features} must end with the stride-32 stage (stage5): "
                          "p6/p7 are computed from p5")
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels, norm=cfg.MODEL.FPN.NORM,
               top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
