"""A test-only re-statement of the original BICLab ``Spiking_vit_MetaFormer`` (its model file, as released).

It keeps the original's module names (so its ``state_dict`` has the original key layout), its Conv1d
token MLP, its ``Sequential(RepConv, BN)`` attention convs and the repeat-the-image-T-times encoding,
and uses a hand-written LIF loop instead of spikingjelly, so that the converter and our blocks are
checked against an independent statement of the equations.
"""
import torch
import torch.nn.functional as F
from torch import nn


class RefLIF(nn.Module):
    """``MultiStepLIFNode(tau=2, v_reset=0, decay_input=True)`` forward, written out."""

    def __init__(self, v_threshold=1.0):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x):
        v = torch.zeros_like(x[0])
        out = []
        for xt in x:
            h = v + (xt - v) / 2.0
            s = (h >= self.v_threshold).to(x.dtype)
            v = h * (1 - s)
            out.append(s)
        return torch.stack(out)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x):
        out = self.bn(x)
        p = self.pad_pixels
        pad = (self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach()
               / torch.sqrt(self.bn.running_var + self.bn.eps)).view(1, -1, 1, 1)
        out = F.pad(out, [p] * 4)
        out[:, :, :p, :] = pad
        out[:, :, -p:, :] = pad
        out[:, :, :, :p] = pad
        out[:, :, :, -p:] = pad
        return out


class RepConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cin, 1, bias=False), BNAndPadLayer(1, cin),
            nn.Sequential(nn.Conv2d(cin, cin, 3, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
                          nn.BatchNorm2d(cout)))

    def forward(self, x):
        return self.body(x)


class SepConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        med = 2 * dim
        self.lif1, self.lif2 = RefLIF(), RefLIF()
        self.pwconv1 = nn.Conv2d(dim, med, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(med)
        self.dwconv = nn.Conv2d(med, med, 7, padding=3, groups=med, bias=False)
        self.pwconv2 = nn.Conv2d(med, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        T, B, C, H, W = x.shape
        x = self.lif1(x)
        x = self.bn1(self.pwconv1(x.flatten(0, 1))).reshape(T, B, -1, H, W)
        x = self.lif2(x)
        x = self.dwconv(x.flatten(0, 1))
        return self.bn2(self.pwconv2(x)).reshape(T, B, -1, H, W)


class MS_ConvBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.Conv = SepConv(dim)
        self.lif1, self.lif2 = RefLIF(), RefLIF()
        self.conv1 = nn.Conv2d(dim, dim * 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim * 4)
        self.conv2 = nn.Conv2d(dim * 4, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        T, B, C, H, W = x.shape
        x = self.Conv(x) + x
        feat = x
        x = self.bn1(self.conv1(self.lif1(x).flatten(0, 1))).reshape(T, B, 4 * C, H, W)
        x = self.bn2(self.conv2(self.lif2(x).flatten(0, 1))).reshape(T, B, C, H, W)
        return feat + x


class MS_MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1_conv = nn.Conv1d(dim, hidden, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = RefLIF()
        self.fc2_lif = RefLIF()
        self.fc2_conv = nn.Conv1d(hidden, dim, 1)
        self.fc2_bn = nn.BatchNorm1d(dim)
        self.hidden = hidden

    def forward(self, x):
        T, B, C, H, W = x.shape
        x = self.fc1_lif(x.flatten(3))
        x = self.fc1_bn(self.fc1_conv(x.flatten(0, 1))).reshape(T, B, self.hidden, H * W)
        x = self.fc2_lif(x)
        return self.fc2_bn(self.fc2_conv(x.flatten(0, 1))).reshape(T, B, C, H, W)


class MS_Attention(nn.Module):
    def __init__(self, dim, heads=8):
        super().__init__()
        self.heads = heads
        self.head_lif, self.q_lif, self.k_lif, self.v_lif = RefLIF(), RefLIF(), RefLIF(), RefLIF()
        self.attn_lif = RefLIF(0.5)
        for n in ("q", "k", "v", "proj"):
            setattr(self, f"{n}_conv", nn.Sequential(RepConv(dim, dim), nn.BatchNorm2d(dim)))

    def _split(self, s, T, B, N, C):
        return s.flatten(3).transpose(-1, -2).reshape(T, B, N, self.heads, C // self.heads).permute(0, 1, 3, 2, 4)

    def forward(self, x):
        T, B, C, H, W = x.shape
        N = H * W
        x = self.head_lif(x)
        q = self.q_lif(self.q_conv(x.flatten(0, 1)).reshape(T, B, C, H, W))
        k = self.k_lif(self.k_conv(x.flatten(0, 1)).reshape(T, B, C, H, W))
        v = self.v_lif(self.v_conv(x.flatten(0, 1)).reshape(T, B, C, H, W))
        q, k, v = (self._split(s, T, B, N, C) for s in (q, k, v))
        x = k.transpose(-2, -1) @ v
        x = (q @ x) * 0.125
        x = x.transpose(3, 4).reshape(T, B, C, N)
        x = self.attn_lif(x).reshape(T, B, C, H, W)
        return self.proj_conv(x.flatten(0, 1)).reshape(T, B, C, H, W)


class MS_Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = MS_Attention(dim)
        self.mlp = MS_MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class MS_DownSampling(nn.Module):
    def __init__(self, cin, cout, k=3, s=2, p=1, first_layer=False):
        super().__init__()
        self.encode_conv = nn.Conv2d(cin, cout, k, s, p)
        self.encode_bn = nn.BatchNorm2d(cout)
        if not first_layer:
            self.encode_lif = RefLIF()

    def forward(self, x):
        T, B = x.shape[:2]
        if hasattr(self, "encode_lif"):
            x = self.encode_lif(x)
        x = self.encode_conv(x.flatten(0, 1))
        return self.encode_bn(x).reshape(T, B, *x.shape[1:])


class Spiking_vit_MetaFormer(nn.Module):
    def __init__(self, embed_dim, num_classes=1000, kd=False, head_on_spikes=True):
        super().__init__()
        c0, c1, c2, c3 = embed_dim
        self.T = 1
        self.head_on_spikes = head_on_spikes
        self.downsample1_1 = MS_DownSampling(3, c0 // 2, 7, 2, 3, first_layer=True)
        self.ConvBlock1_1 = nn.ModuleList([MS_ConvBlock(c0 // 2)])
        self.downsample1_2 = MS_DownSampling(c0 // 2, c0)
        self.ConvBlock1_2 = nn.ModuleList([MS_ConvBlock(c0)])
        self.downsample2 = MS_DownSampling(c0, c1)
        self.ConvBlock2_1 = nn.ModuleList([MS_ConvBlock(c1)])
        self.ConvBlock2_2 = nn.ModuleList([MS_ConvBlock(c1)])
        self.downsample3 = MS_DownSampling(c1, c2)
        self.block3 = nn.ModuleList([MS_Block(c2) for _ in range(6)])
        self.downsample4 = MS_DownSampling(c2, c3, 3, 1, 1)
        self.block4 = nn.ModuleList([MS_Block(c3) for _ in range(2)])
        self.lif = RefLIF()
        self.head = nn.Linear(c3, num_classes)
        self.kd = kd
        if kd:
            self.head_kd = nn.Linear(c3, num_classes)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        for m in [self.downsample1_1, *self.ConvBlock1_1, self.downsample1_2, *self.ConvBlock1_2,
                  self.downsample2, *self.ConvBlock2_1, *self.ConvBlock2_2, self.downsample3, *self.block3,
                  self.downsample4, *self.block4]:
            x = m(x)
        x = x.flatten(3).mean(3)
        x_lif = self.lif(x)
        out = self.head(x_lif if self.head_on_spikes else x).mean(0)
        if self.kd:
            out_kd = self.head_kd(x_lif).mean(0)
            return (out, out_kd) if self.training else (out + out_kd) / 2
        return out
