"""Reference architectures used in the sparse-training literature, plus torchvision / timm passthrough.

Every architecture is registered by name (:func:`register_model`, :func:`list_models`); :func:`build_model`
builds one for an input shape and a class count, and :func:`model_spec` is the JSON-able recipe that checkpoints
and export files keep so that the model can be rebuilt. All weights are drawn from torch's global RNG at
construction, so ``torch.manual_seed(s)`` before :func:`build_model` makes initialization reproducible.

Adding an architecture is one decorated builder in this file::

    @register_model("mynet", example_input=(3, 32, 32), help="what it is (paper, arXiv id)")
    def _build_mynet(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return MyNet(shape[0], num_classes)

``example_input`` is a sample shape (without the batch axis) the tests build and run it on.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._registry import Registry

__all__ = [
    "MODELS",
    "ConvBase",
    "LeNet5",
    "GPT",
    "MobileNetV1",
    "ResNetCifar",
    "VisionTransformer",
    "WideResNet",
    "build_model",
    "check_model_name",
    "list_models",
    "mlp",
    "model_options",
    "model_spec",
    "register_model",
    "sample_input",
    "takes_tokens",
]

logger = logging.getLogger(__name__)

# A builder takes the sample shape (without the batch axis), the number of classes and the model's options.
ModelBuilder = Callable[..., nn.Module]

MODEL_REGISTRY: Registry[ModelBuilder] = Registry("model")


def register_model(
    name: str,
    *,
    example_input: Sequence[int],
    help: str | None = None,
    options: dict[str, Any] | None = None,
    tokens: bool = False,
) -> Callable:
    """Decorator: register a builder ``(input_shape, num_classes, **options) -> nn.Module`` as model ``name``.

    ``example_input`` is a sample shape the model is meant for; the tests build every registered model on it.
    ``options`` are the keyword options the builder takes, with their defaults (``model_options`` of a run).
    ``tokens=True`` declares a language model: its input is integer token ids in ``[0, num_classes)`` of shape
    ``(batch, T)`` and its output one row of logits per position, ``(batch, T, num_classes)``.
    """
    return MODEL_REGISTRY.register(
        name, help=help, example_input=tuple(int(s) for s in example_input), options=dict(options or {}),
        tokens=bool(tokens),
    )  # fmt: skip


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the glob ``pattern``, in registration order."""
    return MODEL_REGISTRY.names(pattern)


_EXTERNAL_PREFIXES = ("torchvision:", "timm:")


def _kaiming_init_(module: nn.Module) -> None:
    """He-normal init for convolutions (fan-out, as in He et al.), unit-scale BatchNorm, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _require_image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs of shape (C, H, W), got input_shape={tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


# --------------------------------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------------------------------


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (300, 100)) -> nn.Sequential:
    """LeNet-300-100: flatten, then fully connected layers with ReLU between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """The common modern LeNet-5 (ReLU + max-pooling) with the classifier sized for the input.

    The second convolution is unpadded in the classic net; for inputs smaller than 12x12 (e.g. the
    8x8 sklearn digits) that would shrink the maps to nothing, so both convolutions are padded then.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        # conv1 (pad 2) keeps the size, pool halves it, conv2 (5x5, no pad) removes 4, pool halves:
        # the result must be at least 1x1, i.e. the input at least 12x12.
        pad2 = 0 if min(image_size) >= 12 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        # A dummy forward gives the flattened size for any input resolution; no_grad + an all-zero
        # input keeps it from consuming random numbers or building a graph.
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, *image_size)).numel()
        if flat == 0:
            raise ValueError(f"LeNet5: input of size {image_size} is too small")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class ConvBase(nn.Module):
    """The 1-D convolutional baseline of MNIST-1D (Greydanus 2020): three strided convs and a linear head."""

    def __init__(self, in_channels: int, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, length)).shape[1]
        self.linear = nn.Linear(flat, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # (N, L) sequences have no channel axis: (N, 1, L). A reshape rather than `if x.dim() == 2`, so that
        # torch.fx can trace the model (structured pruning follows its graph).
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.linear(self.features(x))


# --------------------------------------------------------------------------------------------------
# ResNets for CIFAR (He et al. 2016) and Wide ResNets (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Option B of He et al.: a projection only where the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): 3 stages of n basic blocks with 16, 32 and 64 channels."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class _WideBlock(nn.Module):
    """Pre-activation block of a Wide ResNet: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        # As in the reference implementation, a projection shortcut sees the pre-activated input,
        # while an identity shortcut carries the raw input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-d-k: 3 stages of (d-4)/6 pre-activation blocks with widths 16k, 32k and 64k."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_WideBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming_init_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = torch.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


# --------------------------------------------------------------------------------------------------
# MobileNetV1 (Howard et al. 2017), CIFAR variant
# --------------------------------------------------------------------------------------------------

# (output channels, stride) of the 13 depthwise-separable layers. The CIFAR variant keeps the
# ImageNet strides here but uses stride 1 in the stem, so a 32x32 input ends at 2x2.
_MOBILENET_CFG: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 for small images: a 3x3 stem then 13 depthwise-separable conv layers (64..1024 wide)."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width_multiplier: float = 1.0, stem_stride: int = 1
    ) -> None:
        super().__init__()
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")

        def width(c: int) -> int:
            return max(8, int(round(c * width_multiplier)))

        layers: list[nn.Module] = [_conv_bn_relu(in_channels, width(32), 3, stem_stride)]
        ch = width(32)
        for out, stride in _MOBILENET_CFG:
            out = width(out)
            # Depthwise 3x3 (one filter per channel) followed by a pointwise 1x1 mixing channels.
            layers.append(nn.Sequential(_conv_bn_relu(ch, ch, 3, stride, groups=ch), _conv_bn_relu(ch, out, 1, 1)))
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        _kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------------------
# Transformers: a GPT-style decoder (Radford et al. 2019, sized as nanoGPT) and a small ViT (Dosovitskiy et al.)
# --------------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections, each an ``nn.Linear``.

    Separate Linear modules (not ``nn.MultiheadAttention``, which applies its projections through functional calls)
    so that every projection is a named weight the sparsifier selects and the FLOP counter sees.
    """

    def __init__(self, width: int, heads: int, causal: bool, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape

        def split(h: Tensor) -> Tensor:  # (B, T, C) -> (B, heads, T, C / heads)
            return h.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal,
        )  # fmt: skip
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))`` with a 4x wide GELU MLP."""

    def __init__(self, width: int, heads: int, causal: bool, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads, causal, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc_out(nn.functional.gelu(self.fc(self.ln2(x)))))


def _transformer_init_(module: nn.Module, layers: int) -> None:
    """GPT-2's initialization: N(0, 0.02) weights and embeddings, zero biases; the projections that write into the
    residual stream (attention output, MLP output) scaled by 1/sqrt(2 layers) so its variance does not grow with
    depth."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj", "fc_out")) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _check_positive(model: str, **values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {model!r}: option {key} must be a positive integer, got {value!r}")


class GPT(nn.Module):
    """A GPT-style decoder-only language model (Radford et al. 2019, "Language Models are Unsupervised Multitask
    Learners"; the layout of Karpathy's nanoGPT): token and learned position embeddings, ``layers`` pre-LN blocks of
    causal self-attention and a GELU MLP, a final LayerNorm and a linear head over the vocabulary.

    ``forward(idx)`` takes token ids ``(batch, T)`` (any integer dtype, ``T <= context``) and returns logits
    ``(batch, T, vocab)``: position t predicts token t + 1. With ``tied=True`` the head shares the token embedding's
    weight (one parameter, two names: ``tok_emb.weight`` and ``head.weight``).

    Sparsified by default: the attention projections (q, k, v, proj), the MLP (fc, fc_out) and an untied head.
    Kept dense by default (``keep_dense``): the token and position embeddings, and so a head tied to the token
    embedding; LayerNorms and biases are 1-D and never selected.
    """

    keep_dense = ("tok_emb.weight", "pos_emb.weight")

    def __init__(
        self, vocab: int, context: int, *, layers: int = 4, heads: int = 4, width: int = 128, tied: bool = True,
        dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_positive("gpt", vocab=vocab, context=context, layers=layers, heads=heads, width=width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model 'gpt': option dropout must be in [0, 1), got {dropout!r}")
        self.context = context
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, causal=True, dropout=dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        _transformer_init_(self, layers)
        if tied:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if not torch.jit.is_tracing() and t > self.context:  # ONNX export traces a fixed length: no check there
            raise ValueError(f"gpt: sequence of length {t} is longer than the model's context {self.context}")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx.long()) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class VisionTransformer(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", arXiv 2010.11929):
    non-overlapping ``patch x patch`` patches linearly embedded (a strided convolution), a class token, learned
    position embeddings, ``layers`` pre-LN blocks of bidirectional self-attention and a GELU MLP, a final LayerNorm
    and a linear classifier on the class token.

    Sparsified by default: the attention projections, the MLP and the classifier. Kept dense by default
    (``keep_dense``): the patch embedding, the class token and the position embeddings (and every 1-D LayerNorm
    weight and bias).
    """

    keep_dense = ("patch_embed.weight", "cls_token", "pos_embed")

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], num_classes: int, *, patch: int = 4, layers: int = 4,
        heads: int = 4, width: int = 64, dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_positive("vit", patch=patch, layers=layers, heads=heads, width=width)
        h, w = image_size
        if h % patch or w % patch:
            raise ValueError(f"model 'vit': patch size {patch} must divide the image size {h}x{w}")
        tokens = (h // patch) * (w // patch) + 1
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, causal=False, dropout=dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        _transformer_init_(self, layers)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = self.drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@register_model("mlp", example_input=(1, 28, 28), help="LeNet-300-100: two hidden layers (300, 100) on flat inputs")
def _build_mlp(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return mlp(math.prod(shape), num_classes)


@register_model("mlp-wide", example_input=(1, 28, 28),
                help="wide MLP: two hidden layers (2048, 2048) on flat inputs, where sparse CPU kernels pay off")
def _build_mlp_wide(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return mlp(math.prod(shape), num_classes, hidden=(2048, 2048))


@register_model("lenet5", example_input=(1, 28, 28), help="LeNet-5 (ReLU, max-pooling) for (C, H, W) images")
def _build_lenet5(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = _require_image_shape("lenet5", shape)
    return LeNet5(c, num_classes, (h, w))


@register_model("convbase", example_input=(1, 40), help="the 1-D conv baseline of MNIST-1D (Greydanus 2020)")
def _build_convbase(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) == 1:  # (L,) sequences: treated as a single channel
        shape = (1, shape[0])
    elif len(shape) != 2:
        raise ValueError(f"model 'convbase' needs 1-D inputs of shape (C, L), got input_shape={shape}")
    return ConvBase(shape[0], shape[1], num_classes)


def _resnet(depth: int) -> ModelBuilder:
    def build(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, _, _ = _require_image_shape(f"resnet{depth}", shape)
        return ResNetCifar(depth, num_classes, in_channels=c)

    return build


def _wide_resnet(depth: int, widen: int) -> ModelBuilder:
    def build(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        c, _, _ = _require_image_shape(f"wrn-{depth}-{widen}", shape)
        return WideResNet(depth, widen, num_classes, in_channels=c)

    return build


for _depth in (20, 32, 56):
    _help = f"CIFAR ResNet-{_depth} (He et al. 2016)"
    register_model(f"resnet{_depth}", example_input=(3, 32, 32), help=_help)(_resnet(_depth))
for _depth, _widen in ((16, 4), (28, 10)):
    _help = f"Wide ResNet-{_depth}-{_widen} (Zagoruyko & Komodakis 2016)"
    register_model(f"wrn-{_depth}-{_widen}", example_input=(3, 32, 32), help=_help)(_wide_resnet(_depth, _widen))


@register_model("mobilenet-v1", example_input=(3, 32, 32), help="MobileNetV1 for small images (Howard et al. 2017)")
def _build_mobilenet_v1(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, _, _ = _require_image_shape("mobilenet-v1", shape)
    return MobileNetV1(num_classes, in_channels=c)


@register_model(
    "gpt",
    example_input=(16,),
    tokens=True,
    options={"layers": 4, "heads": 4, "width": 128, "context": None, "tied": True, "dropout": 0.0},
    help="GPT-style decoder (nanoGPT layout): byte tokens in, next-token logits out; options layers, heads, width, "
    "context (default: the sequence length), tied, dropout",
)
def _build_gpt(shape: tuple[int, ...], num_classes: int, context: int | None = None, **options: Any) -> nn.Module:
    if len(shape) != 1:
        raise ValueError(f"model 'gpt' needs token sequences of shape (T,), got input_shape={shape}")
    if context is not None and context < shape[0]:
        raise ValueError(f"model 'gpt': option context={context} is shorter than the sequences ({shape[0]} tokens)")
    return GPT(num_classes, shape[0] if context is None else context, **options)


@register_model(
    "vit",
    example_input=(1, 28, 28),
    options={"patch": 4, "layers": 4, "heads": 4, "width": 64, "dropout": 0.0},
    help="small Vision Transformer (Dosovitskiy et al. 2021) for (C, H, W) images; options patch, layers, heads, "
    "width, dropout",
)
def _build_vit(shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    c, h, w = _require_image_shape("vit", shape)
    return VisionTransformer(c, (h, w), num_classes, **options)


# The built-in names, in order (``list_models()`` is the live view).
MODELS: tuple[str, ...] = tuple(list_models())


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def _choices_text() -> str:
    return ", ".join(list_models()) + " or torchvision:NAME / timm:NAME"


def check_model_name(name: str) -> str:
    """Return the canonical spelling of ``name`` or raise ValueError listing the choices."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    for prefix in _EXTERNAL_PREFIXES:
        if name.startswith(prefix):
            if not name[len(prefix) :]:
                raise ValueError(f"model {name!r} lacks a name after {prefix!r}")
            return name
    key = name.lower()
    if key not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {_choices_text()}")
    return key


def _import_optional(module: str, package: str, name: str) -> Any:
    # Optional heavy dependencies are imported only when a model from them is requested.
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(
            f"model {name!r} needs the {package} package; install {package} (`pip install {package}`): {exc}"
        ) from exc


def model_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options ``options`` checked against those model ``name`` declares (ValueError naming the allowed ones,
    or the expected type), as a plain dict. Models from torchvision / timm take none."""
    key = check_model_name(name)
    if ":" in key:
        if options:
            raise ValueError(f"model {key!r} takes no model options, got {dict(options)!r}")
        return {}
    return MODEL_REGISTRY.check_options(key, options)


def takes_tokens(name: str) -> bool:
    """Whether model ``name`` is a language model: integer token ids in, one row of logits per position out."""
    key = check_model_name(name)
    return ":" not in key and bool(MODEL_REGISTRY.entry(key).meta.get("tokens"))


def sample_input(
    name: str, input_shape: Sequence[int], num_classes: int, batch: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """A random input batch for model ``name``: standard normal samples, or token ids in ``[0, num_classes)`` for a
    language model (what ``bench`` times and ``export --format onnx`` traces with)."""
    shape = (batch, *(int(s) for s in input_shape))
    if takes_tokens(name):
        return torch.randint(0, num_classes, shape, generator=generator)
    return torch.randn(shape, generator=generator)


def build_model(
    name: str, *, input_shape: Sequence[int], num_classes: int, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build the model ``name`` for samples of ``input_shape`` (without the batch axis).

    ``name`` is one of :func:`list_models`, or ``torchvision:NAME`` / ``timm:NAME`` for a model from
    those packages (imported only then). ``options`` are the model's own options (``gpt``: layers, heads, width,
    ...; see :func:`model_options`). Raises ValueError for an unknown name or option, or an unsuitable shape.
    """
    key = check_model_name(name)
    chosen = model_options(key, options)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {tuple(input_shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")

    model: nn.Module
    if key.startswith("torchvision:"):
        tv_models = _import_optional("torchvision.models", "torchvision", key)
        model = tv_models.get_model(key.split(":", 1)[1], num_classes=num_classes)
    elif key.startswith("timm:"):
        timm = _import_optional("timm", "timm", key)
        model = timm.create_model(key.split(":", 1)[1], num_classes=num_classes, in_chans=shape[0])
    else:
        model = MODEL_REGISTRY.get(key)(shape, num_classes, **chosen)

    logger.debug("built %s with %d parameters", key, sum(p.numel() for p in model.parameters()))
    return model


def model_spec(
    name: str, input_shape: Sequence[int], num_classes: int, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON-able description of a model; ``build_model(**model_spec(...))`` rebuilds it. The model's options
    are kept only when some are given, so the spec of a model without options is what it always was."""
    spec: dict[str, Any] = {
        "name": check_model_name(name),
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
    }
    if options:
        spec["options"] = model_options(name, options)
    return spec
