"""Inference re-parameterization of Meta-SpikeFormer models.

``reparameterize(model, mode)`` returns an *inference copy* (eval mode, no BN left in the blocks) that
computes the same function as ``model.eval()``; the original is not modified. It works on any
``nn.Module`` that contains the blocks of :mod:`metaspike_d2.blocks` (backbone, classifier, the
Detectron2 detection/segmentation models), and leaves every other module untouched.

``mode="fast"`` (default; fewest multiply-adds on dense hardware):
    every ``conv -> BN`` pair of the blocks is folded into one conv with bias. A :class:`RepConv`
    ``1x1 conv -> BN-and-pad -> depthwise 3x3 (pad 0) -> 1x1 conv -> BN`` (in attention followed by an
    outer BN) becomes ``1x1 conv (pad 1, bias) -> depthwise 3x3 -> 1x1 conv (bias)``: a bias-free 1x1
    conv applied with zero padding 1 and the BN folded in outputs exactly the BN's zero-input value on
    the border, which is what BN-and-pad writes there; the two BNs after the second 1x1 conv are both
    affine and fold into it. Cost per pixel ``2C^2 + 9C`` as in training, minus every BN.

``mode="spike"`` (the form the paper's energy accounting assumes, docs/energy.md):
    each RepConv chain (+ outer BN) becomes one dense 3x3 conv (pad 1, bias) on the spike map, and each
    SepConv tail ``depthwise 7x7 -> 1x1 conv -> BN`` one dense 7x7 conv on the spike map, so that every
    conv and linear layer except the encoding conv is driven by binary spikes. Dearer on dense hardware
    (``9C^2`` instead of ``2C^2 + 9C`` per pixel for a RepConv; ``98C^2`` instead of ``4C^2 + 98C`` for a
    SepConv tail of width ``2C -> C``).

Outside the blocks, BNs that follow a conv in a way that can be seen from the module tree are folded
too: ``detectron2.layers.Conv2d(..., norm=BN)`` (its ``norm`` becomes ``None``) and ``conv, BN`` pairs
inside an ``nn.Sequential``; this covers the Detectron2 necks and heads of :mod:`metaspike_d2.d2`.

Folding is done in float64 and cast back to the parameters' dtype. Only BNs in eval form (running
statistics) can be folded, which is why the copy is returned in eval mode; calling ``.train()`` on it
is pointless (there is nothing left to normalise) and it is meant for inference only.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from .blocks import ConvBlock, Downsample, RepConv, SepConv, SpikeDrivenSelfAttention, SpikeMLP

__all__ = ["reparameterize", "MODES", "fold_conv_bn"]

MODES = ("fast", "spike")


def reparameterize(model: nn.Module, mode: str = "fast", inplace: bool = False) -> nn.Module:
    """Return an eval-mode inference copy of ``model`` with its blocks re-parameterized (see module doc).

    Args:
        model: any module containing Meta-SpikeFormer blocks.
        mode: ``"fast"`` (BN folding, RepConv kept as 1x1 -> dw 3x3 -> 1x1) or ``"spike"`` (every
            RepConv and SepConv tail collapsed into one dense conv on the spike map).
        inplace: modify ``model`` itself instead of a deep copy.

    Exact up to float rounding: outputs agree with ``model.eval()`` to about 1e-6 relative.
    """
    if mode not in MODES:
        raise ValueError(f"reparameterize: mode must be one of {MODES}, got {mode!r}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    with torch.no_grad():
        for name, module in list(out.named_modules()):
            if isinstance(module, SpikeDrivenSelfAttention):
                for prefix in ("q", "k", "v", "proj"):
                    _reparam_repconv(module, f"{prefix}_conv", f"{prefix}_bn", mode)
            elif isinstance(module, RepConv) and not _has_parent_sdsa(out, name):
                # A RepConv used on its own (not inside an attention block): fold its own BN only.
                parent, attr = _parent(out, name)
                _reparam_repconv(parent, attr, None, mode)
            elif isinstance(module, SepConv):
                module.pwconv1 = fold_conv_bn(module.pwconv1, module.bn1)
                module.bn1 = nn.Identity()
                if mode == "spike":
                    module.pwconv2 = _dense_sepconv_tail(module.dwconv, module.pwconv2, module.bn2)
                    module.dwconv = nn.Identity()
                else:
                    module.pwconv2 = fold_conv_bn(module.pwconv2, module.bn2)
                module.bn2 = nn.Identity()
            elif isinstance(module, (ConvBlock, SpikeMLP)):
                first, second = ("conv1", "conv2") if isinstance(module, ConvBlock) else ("fc1", "fc2")
                setattr(module, first, fold_conv_bn(getattr(module, first), module.bn1))
                setattr(module, second, fold_conv_bn(getattr(module, second), module.bn2))
                module.bn1 = nn.Identity()
                module.bn2 = nn.Identity()
            elif isinstance(module, Downsample):
                module.conv = fold_conv_bn(module.conv, module.bn)
                module.bn = nn.Identity()
            elif _is_d2_conv_with_bn(module):
                # detectron2.layers.Conv2d(..., norm=BN) in the necks/heads: fold, then drop the norm.
                folded = fold_conv_bn(module, module.norm)
                module.weight.data = folded.weight.data
                module.bias = folded.bias
                module.norm = None
            elif isinstance(module, nn.Sequential):
                # ``Sequential(conv, BN, ...)`` (e.g. the spiking RetinaNet subnets): fold each pair.
                children = list(module._modules.items())
                for (_, conv), (bn_key, bn) in zip(children, children[1:]):
                    if type(conv) is nn.Conv2d and _is_bn(bn):
                        key = next(k for k, v in module._modules.items() if v is conv)
                        module._modules[key] = fold_conv_bn(conv, bn)
                        module._modules[bn_key] = nn.Identity()
    return out


def _is_d2_conv_with_bn(module: nn.Module) -> bool:
    """``detectron2.layers.Conv2d`` (recognised without importing Detectron2) whose ``norm`` is a BN."""
    norm = getattr(module, "norm", None)
    return (isinstance(module, nn.Conv2d) and type(module).__module__.startswith("detectron2.")
            and norm is not None and _is_bn(norm))


# --------------------------------------------------------------------------------------------------
# Folding primitives (float64, then back to the parameters' dtype)
# --------------------------------------------------------------------------------------------------
def _is_bn(module: nn.Module) -> bool:
    """A torch BatchNorm (incl. SyncBatchNorm and Detectron2's NaiveSyncBatchNorm) or a frozen BN with the
    same buffers (Detectron2's ``FrozenBatchNorm2d``; matched by name so that the core needs no
    Detectron2 import)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def _bn_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = scale * x + shift`` per channel (float64)."""
    if not _is_bn(bn):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    mean = bn.running_mean.double()
    var = bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _new_conv(weight: torch.Tensor, bias: torch.Tensor, like: nn.Conv2d, *, padding=None,
              groups: Optional[int] = None) -> nn.Conv2d:
    """A ``Conv2d`` holding ``weight``/``bias`` (cast to ``like``'s dtype/device), stride etc. of ``like``."""
    out_ch, in_per_group, kh, kw = weight.shape
    groups = like.groups if groups is None else groups
    conv = nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), stride=like.stride,
                     padding=like.padding if padding is None else padding, dilation=like.dilation,
                     groups=groups, bias=True, padding_mode=like.padding_mode,
                     device=like.weight.device, dtype=like.weight.dtype)
    conv.weight.copy_(weight.to(like.weight.dtype))
    conv.bias.copy_(bias.to(like.weight.dtype))
    return conv.requires_grad_(like.weight.requires_grad)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module, padding=None) -> nn.Conv2d:
    """``BN(conv(x))`` (BN in eval form) as one conv with bias; optionally with another ``padding``."""
    scale, shift = _bn_affine(bn)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    return _new_conv(w, b, conv, padding=padding)


def _repconv_affines(rep: RepConv, outer_bn: Optional[nn.Module]):
    """The RepConv chain as ``W2 @ dw(pad_b1(W1 x)) + b2`` with every BN folded (float64 tensors)."""
    s1, b1 = _bn_affine(rep.bn_pad)
    w1 = rep.pw1.weight.double()[:, :, 0, 0] * s1[:, None]  # (C, C_in)
    s2, b2 = _bn_affine(rep.bn)
    if outer_bn is not None:
        s3, b3 = _bn_affine(outer_bn)
        s2, b2 = s3 * s2, s3 * b2 + b3
    w2 = rep.pw2.weight.double()[:, :, 0, 0] * s2[:, None]  # (C_out, C)
    return w1, b1, w2, b2


def _reparam_repconv(parent: nn.Module, conv_attr: str, bn_attr: Optional[str], mode: str) -> None:
    rep = getattr(parent, conv_attr)
    if not isinstance(rep, RepConv):
        raise TypeError(f"{type(parent).__name__}.{conv_attr} is {type(rep).__name__}, not a RepConv")
    if rep.bn_pad.pad != 1 or rep.dw.kernel_size != (3, 3) or rep.dw.padding != (0, 0):
        raise ValueError("only the paper's RepConv (pad 1, depthwise 3x3, padding 0) can be re-parameterized")
    outer = getattr(parent, bn_attr) if bn_attr is not None else None
    w1, b1, w2, b2 = _repconv_affines(rep, outer)
    if mode == "fast":
        rep.pw1 = _new_conv(w1[:, :, None, None], b1, rep.pw1, padding=1)
        rep.bn_pad = nn.Identity()
        rep.pw2 = _new_conv(w2[:, :, None, None], b2, rep.pw2)
        rep.bn = nn.Identity()
    else:
        dw = rep.dw.weight.double()[:, 0]  # (C, 3, 3)
        weight = torch.einsum("ockl,ci->oikl", w2[:, :, None, None] * dw[None], w1)
        bias = w2 @ (b1 * dw.sum((1, 2))) + b2
        setattr(parent, conv_attr, _new_conv(weight, bias, rep.pw1, padding=1, groups=1))
    if bn_attr is not None:
        setattr(parent, bn_attr, nn.Identity())


def _dense_sepconv_tail(dw: nn.Conv2d, pw: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """``BN(pw(dw(x)))`` (depthwise k x k, zero padding) as one dense k x k conv with bias."""
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels or dw.padding_mode != "zeros":
        raise ValueError("SepConv tail must be a zero-padded depthwise conv")
    scale, shift = _bn_affine(bn)
    w_pw = pw.weight.double()[:, :, 0, 0] * scale[:, None]  # (C_out, C_hid)
    bias = shift if pw.bias is None else pw.bias.double() * scale + shift
    if dw.bias is not None:
        bias = bias + w_pw @ dw.bias.double()
    weight = w_pw[:, :, None, None] * dw.weight.double()[:, 0][None]  # (C_out, C_hid, k, k)
    return _new_conv(weight, bias, dw, groups=1)


# --------------------------------------------------------------------------------------------------
# Module-tree helpers
# --------------------------------------------------------------------------------------------------
def _parent(root: nn.Module, name: str) -> Tuple[nn.Module, str]:
    if not name:
        raise ValueError("cannot replace the root module itself; wrap it in a container first")
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def _has_parent_sdsa(root: nn.Module, name: str) -> bool:
    return bool(name) and isinstance(_parent(root, name)[0], SpikeDrivenSelfAttention)
