"""Faster modules for open_clip's towers: the same function of the same parameters, under the same names.

``speed_up(model)`` swaps modules of a model built by ``open_clip.create_model`` in place:

* every self-attention ``nn.MultiheadAttention`` of a ``ResidualAttentionBlock`` becomes a
  ``PackedAttention``: one packed QKV projection, viewed (not copied) into heads, through
  ``scaled_dot_product_attention`` (flash / memory-efficient kernels; ``is_causal`` for the
  text tower's causal mask instead of an additive mask);
* a ViT's patch convolution (kernel = stride, no padding) becomes a ``PatchEmbed``: a
  reshape of the image into patches and one matrix product.

Parameters are moved, not copied, and keep their names (``attn.in_proj_weight``,
``attn.out_proj.weight``, ``visual.conv1.weight``): state dicts load both ways between a
sped-up model and open_clip's own. Modules it cannot prove equivalent are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn


class PackedAttention(nn.Module):
    """Self-attention computing what ``nn.MultiheadAttention(batch_first=True)`` computes, from its parameters.

    Called as open_clip calls its attention: ``attn(x, x, x, need_weights=False, attn_mask=m)[0]``.
    ``causal=True`` means the caller's mask is known to be the causal mask; it is then
    replaced by ``is_causal`` (the fused kernels' own masking).
    """

    def __init__(self, mha: nn.MultiheadAttention, causal: bool = False):
        super().__init__()
        self.num_heads, self.causal = mha.num_heads, causal
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        batch, length, width = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.causal:
            attn_mask = None
        elif attn_mask is not None and attn_mask.ndim == 3:  # (batch * heads, L, L) as nn.MultiheadAttention takes it
            attn_mask = attn_mask.view(batch, self.num_heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


class PatchEmbed(nn.Module):
    """A patch convolution (kernel = stride, no padding, no groups) as a reshape and one matrix product.

    Returns what the convolution returns, ``(B, width, H / p, W / p)``, as a view whose
    flattening into ``(B, patches, width)`` (open_clip's next step) copies nothing.
    Patches are flattened in (row, column, channel) order, the order of a channels-last image.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = conv.weight
        self.bias = conv.bias  # None in open_clip's ViTs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        p = self.patch
        if height % p or width % p:  # the convolution drops the remainder; so does it here
            return F.conv2d(images, self.weight, self.bias, stride=p)
        rows, cols = height // p, width // p
        patches = images.permute(0, 2, 3, 1).reshape(batch, rows, p, cols, p, channels).transpose(2, 3)
        patches = patches.reshape(batch, rows * cols, p * p * channels)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.weight.shape[0], -1)
        out = F.linear(patches, weight, self.bias)  # (B, patches, width)
        return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


def _plain_self_attention(block: nn.Module) -> bool:
    mha = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and not hasattr(block, "ln_1_kv")  # cross-attention
        and isinstance(mha, nn.MultiheadAttention)
        and mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_bias is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
        and mha.dropout == 0.0
    )


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.device.type == "meta":
        return False
    causal = torch.full_like(mask, float("-inf")).triu_(1)
    return torch.equal(mask, causal)


def _text_transformers(model: nn.Module) -> dict[int, bool]:
    """id(text transformer) -> whether every call of its blocks gets exactly the causal mask."""
    found = {}
    if hasattr(model, "transformer") and hasattr(model, "attn_mask"):  # open_clip.CLIP
        found[id(model.transformer)] = _is_causal_mask(model.attn_mask)
    text = getattr(model, "text", None)  # open_clip.CustomTextCLIP's TextTransformer
    if text is not None and hasattr(text, "transformer"):
        plain = not getattr(text, "use_pad_mask", False) and getattr(text, "cls_emb", None) is None
        found[id(text.transformer)] = plain and _is_causal_mask(getattr(text, "attn_mask", None))
    return found


def speed_up(model: nn.Module, *, attention: bool = True, patch_embed: bool = True) -> dict[str, int]:
    """Swap in the faster modules (in place); returns how many of each were swapped."""
    swapped = {"attention": 0, "patch_embed": 0}
    if attention:
        causal_of = _text_transformers(model)
        for transformer in [m for m in model.modules() if hasattr(m, "resblocks")]:
            causal = causal_of.get(id(transformer), False)
            for block in transformer.resblocks:
                if _plain_self_attention(block):
                    block.attn = PackedAttention(block.attn, causal=causal)
                    swapped["attention"] += 1
    if patch_embed:
        for module in model.modules():
            conv = getattr(module, "conv1", None)
            if (
                isinstance(module, VisionTransformer)
                and isinstance(conv, nn.Conv2d)
                and conv.kernel_size == conv.stride
                and conv.kernel_size[0] == conv.kernel_size[1]
                and conv.padding == (0, 0)
                and conv.dilation == (1, 1)
                and conv.groups == 1
            ):
                module.conv1 = PatchEmbed(conv)
                swapped["patch_embed"] += 1
    return swapped
