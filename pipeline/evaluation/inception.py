"""The FID Inception-v3: the TensorFlow reference graph (inception-2015-12-05) in plain PyTorch.

FID numbers are only comparable to the literature (the paper's Table 2) when the features are the pool3
activations (2048-d) of *that* network, so this module rebuilds it module for module, with the key names of
the PyTorch port distributed as ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid), and loads those
weights **strictly**. No torchvision: it is not installable here, and the FID graph differs from
torchvision's Inception3 anyway. The TF-graph quirks that matter numerically:

* input: bilinear resize to 299x299 (``align_corners=False``, no antialiasing), pixel range [-1, 1];
* the average pools inside Mixed_5b..5d (block A), Mixed_6b..6e (block C) and Mixed_7b (block E_1) ignore
  the zero padding (``count_include_pad=False``), as TF's ``avg_pool`` does;
* Mixed_7c (block E_2) uses a *max* pool in its pool branch (an oddity of the 2015 graph);
* BatchNorm eps = 0.001; convolutions have no bias; the classifier has 1008 classes.

Weights never come from anywhere implicit: a path, ``file://``, ``http(s)://`` or ``s3://`` URI given as an
argument or in ``$SPARSEGEN_INCEPTION_WEIGHTS``. Without one, ``load_inception`` raises
``InceptionWeightsUnavailable`` so FID can never be computed with random weights by accident.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV = "SPARSEGEN_INCEPTION_WEIGHTS"
REFERENCE_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
REFERENCE_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + REFERENCE_WEIGHTS_NAME
FEATURE_DIM = 2048
INPUT_SIDE_PX = 299
NUM_CLASSES = 1008
# torch.hub's convention: a file named "<stem>-<first 8 hex of its sha256>.<ext>" carries its own checksum.
_HASHED_NAME = re.compile(r"-([0-9a-f]{8,})\.pth?$")


class InceptionWeightsUnavailable(RuntimeError):
    """No (valid) FID Inception weights were given; the message says how to provide them."""


def missing_weights_message() -> str:
    return (
        "FID unavailable: no Inception weights. FID needs the TensorFlow reference Inception-v3 "
        f"(2015-12-05) ported to PyTorch, {REFERENCE_WEIGHTS_NAME} ({REFERENCE_WEIGHTS_URL}). "
        f"Download it once and pass --inception-weights PATH|URL|s3://... or set ${WEIGHTS_ENV}; "
        "sparsegen never downloads it itself and never computes FID with random weights."
    )


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU: every convolution of the TF graph."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's avg_pool with SAME padding divides by the number of *real* pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b (``pool="avg"``, TF's padding-excluding average) and Mixed_7c (``pool="max"``)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:  # the 2015 graph's Mixed_7c pools with max (pytorch-fid's FIDInceptionE_2)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] (B, 3, H, W), any H, W -> pool3 features (B, 2048) of the TF reference graph.

    Module names equal the keys of ``pt_inception-2015-12-05-6726825d.pth`` so its state dict loads strictly.
    ``fc`` (2048 -> 1008) is part of the file and is loaded, but pool3 features are taken before it.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, images_pm1: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """``resize=False`` skips the 299 px resize (only for tests and benchmarks: FID needs the resize)."""
        x = images_pm1
        if resize and x.shape[-2:] != (INPUT_SIDE_PX, INPUT_SIDE_PX):
            # Resizing commutes with the affine [0,1] -> [-1,1] map (bilinear weights sum to 1), so resizing
            # [-1,1] images equals pytorch-fid's resize-then-scale of [0,1] images.
            x = F.interpolate(x, size=(INPUT_SIDE_PX, INPUT_SIDE_PX), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # pool3: (B, 2048)


def _is_optional_key(key: str) -> bool:
    # BatchNorm's step counter: absent from files saved before PyTorch 0.4.1, and never used in eval mode.
    return key.endswith("num_batches_tracked")


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the reference file must hold (BatchNorm step counters excluded)."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not _is_optional_key(k)}


def check_state_dict(state: dict) -> None:
    """Raise ``InceptionWeightsUnavailable`` unless ``state`` has exactly the reference keys and shapes."""
    if not isinstance(state, dict):
        raise InceptionWeightsUnavailable(f"Inception weights: expected a state dict, got {type(state).__name__}")
    expected = expected_state_shapes()
    present = {k for k in state if not _is_optional_key(k)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} != expected {expected[k]}"
        for k in set(expected) & present
        if tuple(getattr(state[k], "shape", ())) != expected[k]
    )
    if missing or unexpected or wrong:
        lines = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                lines.append(f"{title}: {shown}")
        raise InceptionWeightsUnavailable(
            f"these are not the {REFERENCE_WEIGHTS_NAME} weights (strict load failed): " + "; ".join(lines)
        )


def resolve_weights_source(weights: str | os.PathLike | None = None) -> str:
    """The weights location from the argument, else ``$SPARSEGEN_INCEPTION_WEIGHTS``; raises when neither."""
    source = str(weights) if weights else os.environ.get(WEIGHTS_ENV, "").strip()
    if not source:
        raise InceptionWeightsUnavailable(missing_weights_message())
    return source


def read_weights_bytes(source: str) -> bytes:
    """Bytes of the weights file at a local path, ``file://``, ``http(s)://`` or ``s3://`` location."""
    try:
        if source.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 - user-given URL
                return response.read()
        from pipeline.data import storage

        path = source[len("file://"):] if source.startswith("file://") else source
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise InceptionWeightsUnavailable(f"Inception weights not found: {source}. {missing_weights_message()}") from None
    except OSError as error:
        raise InceptionWeightsUnavailable(f"cannot read Inception weights {source}: {error}") from error


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """(FIDInceptionV3 in eval mode with the reference weights, sha256 of the weights file).

    Raises ``InceptionWeightsUnavailable`` when no weights are given, they cannot be read, their name carries a
    checksum they fail, or their keys/shapes are not the reference file's.
    """
    source = resolve_weights_source(weights)
    data = read_weights_bytes(source)
    digest = hashlib.sha256(data).hexdigest()
    named = _HASHED_NAME.search(source.rstrip("/").rsplit("/", 1)[-1])
    if named and not digest.startswith(named.group(1)):
        raise InceptionWeightsUnavailable(
            f"Inception weights {source}: sha256 {digest[:12]}... does not match the checksum {named.group(1)} in "
            "the file name (corrupt or different download)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for a non-checkpoint file
        raise InceptionWeightsUnavailable(f"Inception weights {source}: not a PyTorch state dict ({error})") from error
    check_state_dict(state)
    # Built on the meta device and materialised uninitialised: every value is overwritten by the file, so the
    # default initialisation of 24M parameters would be wasted time.
    with torch.device("meta"):
        model = FIDInceptionV3()
    model = model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():
        if _is_optional_key(name):
            buffer.zero_()
    model.load_state_dict(state, strict=False)  # strictness already checked above, modulo step counters
    return model.to(device).eval(), digest
