"""DAN's Multi-head cross Attention Network + Attention Fusion Network, heads batched.

The official code runs M `CrossAttentionHead`s one after the other. Their shapes are equal, so here
all heads run at once: one 1x1 convolution C -> M*reduced, grouped convolutions (groups=M) for the
3x3, 1x3 and 3x1 branches, and the channel-attention MLPs as batched matmuls. BatchNorm normalises
each channel on its own, so one BatchNorm over the M*channels of the concatenated heads computes the
same batch statistics and running-stat updates as M per-head BatchNorms. The spatial attention is
applied and pooled by `apkernels.dan_spatial_pool` (x * s never exists) and the channel gate plus
the log-softmax fusion across heads by `apkernels.dan_head_fusion`.
"""
import re
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from .._backend import BACKENDS
from ..ops import dan_head_fusion, dan_spatial_pool

# The three spatial branches: official name suffix, kernel size, padding.
BRANCHES = (("3x3", (3, 3), (1, 1)), ("1x3", (1, 3), (0, 1)), ("3x1", (3, 1), (1, 0)))

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

_HEAD_KEY = re.compile(r"cat_head(\d+)\.")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MultiHeadCrossAttention: {name} must be a positive int, got {value!r}")


def _fold_bn(weight, bias, bn: nn.BatchNorm2d | nn.BatchNorm1d):
    """Fold an eval-mode BatchNorm into the preceding linear map (weight [out, ...], bias [out])."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_b = (bias - bn.running_mean) * scale + bn.bias
    return folded_w, folded_b


class MultiHeadCrossAttention(nn.Module):
    """DAN's M cross-attention heads and their log-softmax fusion, batched across heads.

    forward(x [B, C, H, W]) -> (fused [B, C], heads [B, M, C]), exactly the official
    `heads = stack(cat_head{m}(x)); heads = log_softmax(heads, 1) if M > 1; fused = heads.sum(1)`.

    Args:
        in_channels: C, the channels of the shared features (512 in DAN).
        num_heads: M, the number of cross-attention heads (4 in DAN).
        reduced: channels after each head's 1x1 convolution (256 in DAN).
        ca_hidden: hidden width of each head's channel-attention MLP (32 in DAN).
        backend: passed to `apkernels.dan_spatial_pool` / `dan_head_fusion`.

    The parameters are stored batched (see `official_state_dict` / `load_official_state_dict`
    / `from_official` for the official per-head layout). `fuse_for_inference()` folds, in eval
    mode, the three branch convolutions with their BatchNorms into one 3x3 grouped convolution
    and the 1x1 convolution with its BatchNorm into one convolution.
    """

    def __init__(self, in_channels: int = 512, num_heads: int = 4, reduced: int = 256, ca_hidden: int = 32,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_heads", num_heads), ("reduced", reduced),
                            ("ca_hidden", ca_hidden)):
            _check_positive_int(name, value)
        if backend not in BACKENDS:
            raise ValueError(f"MultiHeadCrossAttention: backend must be one of {BACKENDS}, got {backend!r}")
        self.in_channels, self.num_heads, self.reduced, self.ca_hidden = in_channels, num_heads, reduced, ca_hidden
        self.backend = backend
        C, M, R, Hd = in_channels, num_heads, reduced, ca_hidden

        # Spatial attention (official `sa`): conv1x1 + BN, then three branches of conv + BN.
        self.conv1x1 = nn.Conv2d(C, M * R, 1)
        self.bn1x1 = nn.BatchNorm2d(M * R)
        for suffix, kernel, padding in BRANCHES:
            setattr(self, f"conv_{suffix}", nn.Conv2d(M * R, M * C, kernel, padding=padding, groups=M))
            setattr(self, f"bn_{suffix}", nn.BatchNorm2d(M * C))

        # Channel attention (official `ca.attention`): Linear(C, Hd) -> BN1d(Hd) -> ReLU -> Linear(Hd, C).
        # Per-head weights in nn.Linear's [out, in] layout, stacked over the heads.
        self.ca_weight1 = nn.Parameter(torch.empty(M, Hd, C))
        self.ca_bias1 = nn.Parameter(torch.empty(M, Hd))
        self.ca_bn = nn.BatchNorm1d(M * Hd)
        self.ca_weight2 = nn.Parameter(torch.empty(M, C, Hd))
        self.ca_bias2 = nn.Parameter(torch.empty(M, C))

        self._fused = False
        self.reset_parameters()
        # Fused weights derive from the unfolded ones: recompute them after a state-dict load.
        self.register_load_state_dict_post_hook(MultiHeadCrossAttention._refold_after_load)

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self) -> None:
        """The official `CrossAttentionHead.init_weights`, head by head (so fan-outs are per head)."""
        M = self.num_heads
        with torch.no_grad():
            for conv in self._convs():
                for w in conv.weight.chunk(M, 0):
                    nn.init.kaiming_normal_(w, mode="fan_out")
                nn.init.zeros_(conv.bias)
            for bn in self._bns():
                bn.reset_parameters()
            nn.init.normal_(self.ca_weight1, std=0.001)
            nn.init.normal_(self.ca_weight2, std=0.001)
            nn.init.zeros_(self.ca_bias1)
            nn.init.zeros_(self.ca_bias2)
            self.ca_bn.reset_parameters()
        if self._fused:
            self._compute_fused()

    def _convs(self):
        return [self.conv1x1] + [getattr(self, f"conv_{s}") for s, _, _ in BRANCHES]

    def _bns(self):
        return [self.bn1x1] + [getattr(self, f"bn_{s}") for s, _, _ in BRANCHES]

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MultiHeadCrossAttention: x must be a 4-D tensor [B, C, H, W], got {got}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"MultiHeadCrossAttention: x must have in_channels={self.in_channels} channels (dim 1), "
                f"got shape {tuple(x.shape)}"
            )
        if self._fused and self.training:
            raise RuntimeError(
                "MultiHeadCrossAttention: the module was fused for inference; call unfuse() before training"
            )

    def spatial_logits(self, x: torch.Tensor) -> torch.Tensor:
        """z [B, M, C, H, W]: each head's BN(3x3) + BN(1x3) + BN(3x1) branch sum, before the ReLU."""
        self._check_input(x)
        B, C, H, W = x.shape
        if self._fused:
            y = F.conv2d(x, self.fused_weight1x1, self.fused_bias1x1)
            z = F.conv2d(y, self.fused_weight3x3, self.fused_bias3x3, padding=1, groups=self.num_heads)
        else:
            y = self.bn1x1(self.conv1x1(x))
            z = None
            for suffix, _, _ in BRANCHES:
                branch = getattr(self, f"bn_{suffix}")(getattr(self, f"conv_{suffix}")(y))
                z = branch if z is None else z + branch
        return z.view(B, self.num_heads, C, H, W)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head spatial attention maps s [B, M, H, W] (sum over channels of ReLU(z)), for overlays."""
        return reference.dan_spatial_attention(self.spatial_logits(x))

    def channel_gate_logits(self, g: torch.Tensor) -> torch.Tensor:
        """The channel-attention MLP of every head before its sigmoid: g [B, M, C] -> [B, M, C]."""
        if not isinstance(g, torch.Tensor) or g.dim() != 3 or tuple(g.shape[1:]) != (self.num_heads, self.in_channels):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"MultiHeadCrossAttention: g must have shape [B, {self.num_heads}, {self.in_channels}], got {got}"
            )
        B = g.shape[0]
        g_heads = g.transpose(0, 1)  # [M, B, C]: one matmul per head, batched
        if self._fused:
            h = torch.baddbmm(self.fused_ca_bias1.unsqueeze(1), g_heads, self.fused_ca_weight1.transpose(1, 2))
        else:
            h = torch.baddbmm(self.ca_bias1.unsqueeze(1), g_heads, self.ca_weight1.transpose(1, 2))
            h = self.ca_bn(h.transpose(0, 1).reshape(B, -1)).view(B, self.num_heads, -1).transpose(0, 1)
        h = h.relu()
        logits = torch.baddbmm(self.ca_bias2.unsqueeze(1), h, self.ca_weight2.transpose(1, 2))  # [M, B, C]
        return logits.transpose(0, 1)

    def forward(self, x: torch.Tensor):
        z = self.spatial_logits(x)
        g = dan_spatial_pool(x, z.to(x.dtype), backend=self.backend)
        return dan_head_fusion(g, self.channel_gate_logits(g).to(g.dtype), backend=self.backend)

    # ------------------------------------------------------------------ inference folding
    @property
    def is_fused(self) -> bool:
        return self._fused

    def fuse_for_inference(self) -> "MultiHeadCrossAttention":
        """Fold BatchNorms (eval statistics) into the convolutions: 2 convolutions per forward.

        Each head's 3x3, 1x3 and 3x1 branches with their BatchNorms become one 3x3 grouped
        convolution (the 1x3 / 3x1 kernels zero-padded to 3x3, which reads the same inputs), the
        1x1 convolution + BatchNorm one convolution, and the channel-attention BatchNorm folds into
        the first Linear. The unfolded parameters are kept (state_dict is unchanged); `unfuse()`
        returns to them.
        """
        if self.training:
            raise RuntimeError(
                "MultiHeadCrossAttention.fuse_for_inference: the module must be in eval mode "
                "(BatchNorm folding uses the running statistics); call .eval() first"
            )
        self._compute_fused()
        self._fused = True
        return self

    def unfuse(self) -> "MultiHeadCrossAttention":
        """Drop the folded weights: forward uses the trainable unfolded layers again."""
        for name in ("fused_weight1x1", "fused_bias1x1", "fused_weight3x3", "fused_bias3x3",
                     "fused_ca_weight1", "fused_ca_bias1"):
            if name in self._buffers:
                del self._buffers[name]
        self._fused = False
        return self

    @torch.no_grad()
    def _compute_fused(self) -> None:
        w1, b1 = _fold_bn(self.conv1x1.weight, self.conv1x1.bias, self.bn1x1)
        w3 = torch.zeros_like(self.conv_3x3.weight)
        b3 = torch.zeros_like(self.conv_3x3.bias)
        for suffix, (kh, kw), _ in BRANCHES:
            w, b = _fold_bn(getattr(self, f"conv_{suffix}").weight, getattr(self, f"conv_{suffix}").bias,
                            getattr(self, f"bn_{suffix}"))
            top, left = (3 - kh) // 2, (3 - kw) // 2  # centre the 1x3 / 3x1 kernel in the 3x3 one
            w3[:, :, top:top + kh, left:left + kw] += w
            b3 += b
        M = self.num_heads
        ca_w, ca_b = _fold_bn(self.ca_weight1.reshape(M * self.ca_hidden, -1), self.ca_bias1.reshape(-1), self.ca_bn)
        # Non-persistent: the state dict keeps only the unfolded (trainable, official) parameters.
        for name, value in (("fused_weight1x1", w1), ("fused_bias1x1", b1), ("fused_weight3x3", w3),
                            ("fused_bias3x3", b3), ("fused_ca_weight1", ca_w.view_as(self.ca_weight1)),
                            ("fused_ca_bias1", ca_b.view_as(self.ca_bias1))):
            self.register_buffer(name, value.detach().clone(), persistent=False)

    @staticmethod
    def _refold_after_load(module, incompatible_keys) -> None:
        if module._fused:
            module._compute_fused()

    def train(self, mode: bool = True):
        if mode and self._fused:
            raise RuntimeError(
                "MultiHeadCrossAttention: the module was fused for inference; call unfuse() before train()"
            )
        return super().train(mode)

    # ------------------------------------------------------------------ official checkpoints
    def _official_layout(self):
        """(official key suffix, batched tensor, head axis, per-head shape) for every official tensor."""
        C, M, R, Hd = self.in_channels, self.num_heads, self.reduced, self.ca_hidden
        layout = []

        def conv_bn(name, conv, bn, out_ch):
            layout.append((f"sa.{name}.0.weight", conv.weight, (out_ch, *conv.weight.shape[1:])))
            layout.append((f"sa.{name}.0.bias", conv.bias, (out_ch,)))
            for attr in ("weight", "bias", "running_mean", "running_var"):
                layout.append((f"sa.{name}.1.{attr}", getattr(bn, attr), (out_ch,)))
            layout.append((f"sa.{name}.1.num_batches_tracked", bn.num_batches_tracked, ()))

        conv_bn("conv1x1", self.conv1x1, self.bn1x1, R)
        for suffix, _, _ in BRANCHES:
            conv_bn(f"conv_{suffix}", getattr(self, f"conv_{suffix}"), getattr(self, f"bn_{suffix}"), C)
        layout.append(("ca.attention.0.weight", self.ca_weight1, (Hd, C)))
        layout.append(("ca.attention.0.bias", self.ca_bias1, (Hd,)))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            layout.append((f"ca.attention.1.{attr}", getattr(self.ca_bn, attr), (Hd,)))
        layout.append(("ca.attention.1.num_batches_tracked", self.ca_bn.num_batches_tracked, ()))
        layout.append(("ca.attention.3.weight", self.ca_weight2, (C, Hd)))
        layout.append(("ca.attention.3.bias", self.ca_bias2, (C,)))
        return layout

    def official_state_dict(self, prefix: str = "") -> dict:
        """The official per-head tensors: `{prefix}cat_head{m}.sa.*` / `.ca.attention.*` (detached copies)."""
        out = {}
        for m in range(self.num_heads):
            for suffix, tensor, shape in self._official_layout():
                key = f"{prefix}cat_head{m}.{suffix}"
                # num_batches_tracked is shared by the batched BatchNorm: every head gets its value.
                head = tensor if tensor.dim() == 0 else tensor.detach().reshape(self.num_heads, *shape)[m]
                out[key] = head.detach().clone()
        return out

    def load_official_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> IncompatibleKeys:
        """Load the official per-head tensors (keys `{prefix}cat_head{m}.*`; other keys are ignored).

        Returns (missing_keys, unexpected_keys) for the `cat_head*` keys under `prefix`; raises
        ValueError when `strict` and either is not empty, and always on a shape mismatch.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"load_official_state_dict: state_dict must be a dict, got {type(state_dict).__name__}")
        expected = self.official_state_dict(prefix)
        head_prefix = prefix + "cat_head"
        present = [k for k in state_dict if k.startswith(head_prefix)]
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in present if k not in expected]
        mismatched = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)}, module {tuple(expected[k].shape)}"
            for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
        ]
        if mismatched:
            raise ValueError("load_official_state_dict: shape mismatch:\n  " + "\n  ".join(mismatched))
        if strict and (missing or unexpected):
            raise ValueError(
                "load_official_state_dict: the checkpoint does not match "
                f"MultiHeadCrossAttention(in_channels={self.in_channels}, num_heads={self.num_heads}, "
                f"reduced={self.reduced}, ca_hidden={self.ca_hidden}) under prefix {prefix!r}:\n"
                f"  missing keys ({len(missing)}): {missing}\n  unexpected keys ({len(unexpected)}): {unexpected}"
            )
        with torch.no_grad():
            for suffix, tensor, shape in self._official_layout():
                keys = [f"{prefix}cat_head{m}.{suffix}" for m in range(self.num_heads)]
                if tensor.dim() == 0:  # num_batches_tracked: the heads train in lockstep
                    found = [state_dict[k] for k in keys if k in state_dict]
                    if found:
                        tensor.fill_(max(int(v) for v in found))
                    continue
                view = tensor.view(self.num_heads, *shape)
                for m, key in enumerate(keys):
                    if key in state_dict:
                        view[m].copy_(state_dict[key])
        if self._fused:
            self._compute_fused()
        return IncompatibleKeys(missing, unexpected)

    @classmethod
    def from_official(cls, state_dict, prefix: str = "", **kwargs) -> "MultiHeadCrossAttention":
        """Build from an official DAN state dict: num_heads (and the sizes) are read from its keys."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"from_official: state_dict must be a dict, got {type(state_dict).__name__}")
        heads = {int(m.group(1)) for k in state_dict if k.startswith(prefix)
                 for m in [_HEAD_KEY.match(k[len(prefix):])] if m}
        if not heads:
            raise ValueError(f"from_official: no '{prefix}cat_head<m>.*' keys in the state dict")
        if heads != set(range(len(heads))):
            raise ValueError(f"from_official: cat_head indices must be 0..M-1, got {sorted(heads)}")
        kwargs.setdefault("num_heads", len(heads))
        shapes = {
            "reduced": (f"{prefix}cat_head0.sa.conv1x1.0.weight", 0),
            "in_channels": (f"{prefix}cat_head0.sa.conv1x1.0.weight", 1),
            "ca_hidden": (f"{prefix}cat_head0.ca.attention.0.weight", 0),
        }
        for name, (key, dim) in shapes.items():
            if name not in kwargs and key in state_dict:
                kwargs[name] = int(state_dict[key].shape[dim])
        module = cls(**kwargs)
        module.load_official_state_dict(state_dict, prefix=prefix, strict=True)
        return module

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_heads={self.num_heads}, reduced={self.reduced}, "
                f"ca_hidden={self.ca_hidden}, backend={self.backend!r}, fused={self._fused}")
