"""The sparse AND-OR generator and the energy-based critic (Table 1 of the paper).

Generator (64x64, ``paper64``)::

    Z (100) -> FC -> 4x4x3200, ReLU, channel top-k (k=8)                       layer "fc4"
    -> up x2 -> conv 512, ReLU -> conv 512, ReLU, spatial top-k (k=16)         layer "conv8"
    -> up x2 -> conv 256, ReLU -> conv 256, ReLU, spatial top-k (k=64)         layer "conv16"
    -> up x2 -> conv 128, ReLU -> conv 128, ReLU, spatial top-k (k=256)        layer "conv32"
    -> up x2 -> conv 64,  ReLU -> conv 64,  ReLU (dense)                       layer "conv64"
    -> conv 3, tanh

``model.conv_sparsity_axis = "channel"`` makes each conv layer's top-k choose k of its channels at every
position instead of k positions per channel.

Every sparsifiable layer's post-sparsity tensor is returned by ``forward(z, return_activations=True)``.
Because all non-linearities are ReLU masks and top-k masks, fixing the masks of one forward pass makes
the rest of the network linear in any layer's activation: ``propagate`` re-runs the network from a layer
with fixed masks, which is how basis functions (one unit alone, Fig. 1) are drawn.

Critic f(Y; Phi) (Sec. 3.4): conv 64 -> [avgpool, conv 64 x2] -> [avgpool, conv 128 x2] ->
[avgpool, conv 256 x2] -> [avgpool, conv 512 x2] -> FC 1, LeakyReLU(0.2). Its model is
P(Y) ~ exp(-f(Y)) q(Y) with q = N(0, s^2 I) (Eq. 16-17). Training needs f alone: q has no parameters,
so it drops out of Eq. 21's gradient in Phi, and Eq. 20 differentiates f(g(Z)) only, as the paper does.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config
from pipeline.model import sparse_conv, upsample_conv
from pipeline.model.sparsity import relu_topk, spatial_relu_topk


def _init_weight(weight: nn.Parameter, std: float, equalized: bool) -> float:
    """He-normal initialisation; returns the run-time scale. Both parameterisations start from the same
    function: "equalized" stores N(0, 1) and multiplies by ``std`` at run time, "standard" stores the product."""
    nn.init.normal_(weight)
    if equalized:
        return std
    with torch.no_grad():
        weight.mul_(std)
    return 1.0


class ScaledLinear(nn.Module):
    """Linear layer with optional equalized-learning-rate scaling (weights N(0,1), scaled at run time)."""

    _frozen_weight = None  # weight * scale while sparse_conv.frozen_weight_cache is active

    def __init__(self, in_features: int, out_features: int, equalized: bool, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = _init_weight(self.weight, gain / math.sqrt(in_features), equalized)

    def forward(self, x: torch.Tensor, use_bias: bool = True) -> torch.Tensor:
        weight = self.weight * self.scale if self._frozen_weight is None else self._frozen_weight
        return F.linear(x, weight, self.bias if use_bias else None)


class ScaledConv2d(nn.Module):
    """3x3 same-padding convolution with optional equalized-learning-rate scaling."""

    # weight * scale (and its channel-major and transposed-kernel forms) while sparse_conv.frozen_weight_cache
    # is active.
    _frozen_weight = None
    _frozen_channel_major = None
    _frozen_phase_kernel = None

    def __init__(self, in_channels: int, out_channels: int, equalized: bool, gain: float = math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = _init_weight(self.weight, gain / math.sqrt(in_channels * 9), equalized)

    def forward(self, x: torch.Tensor, use_bias: bool = True) -> torch.Tensor:
        weight = self._frozen_weight
        if weight is None:
            weight = self.weight if self.scale == 1.0 else self.weight * self.scale
        return F.conv2d(x, weight, self.bias if use_bias else None, padding=1)

    @property
    def weight_frozen(self) -> bool:
        """Whether ``sparse_conv.frozen_weight_cache`` holds this layer's scaled weight (no weight gradient)."""
        return self._frozen_weight is not None

    def cached_channel_major(self) -> torch.Tensor | None:
        """The frozen weight as ``sparse_conv.channel_major_weight``, built once per cache; None uncached."""
        if self._frozen_weight is None:
            return None
        if self._frozen_channel_major is None:
            self._frozen_channel_major = sparse_conv.channel_major_weight(self._frozen_weight).contiguous()
        return self._frozen_channel_major

    def phase_kernel(self) -> torch.Tensor:
        """``upsample_conv.phase_kernel`` of the scaled weight (upsample x2 + this conv as one transposed
        conv); built once per frozen-weight cache, else from the parameter (differentiable)."""
        if self._frozen_weight is not None:
            if self._frozen_phase_kernel is None:
                self._frozen_phase_kernel = upsample_conv.phase_kernel(self._frozen_weight)
            return self._frozen_phase_kernel
        return upsample_conv.phase_kernel(self.weight if self.scale == 1.0 else self.weight * self.scale)


def conv_blocks(in_channels: int, widths: list[int], convs_per_block: int, equalized: bool) -> nn.ModuleList:
    """One block of ``convs_per_block`` 3x3 convs per width (the first conv of a block changes the width)."""
    blocks = []
    for width in widths:
        convs = []
        for _ in range(convs_per_block):
            convs.append(ScaledConv2d(in_channels, width, equalized))
            in_channels = width
        blocks.append(nn.ModuleList(convs))
    return nn.ModuleList(blocks)


class SparseGenerator(nn.Module):
    """g(Z; Theta, k): the generator of Eq. 7 with top-k sparsity after the activation of each layer."""

    # The first conv after fc4 from fc4's active channels only (sparse_conv.py), and upsample + first conv
    # of the other blocks as one transposed conv where it measured faster (upsample_conv.py). Both give the
    # dense layers' values up to float rounding; off, every block is F.interpolate + conv2d.
    sparse_first_conv = True
    fused_upsample_conv = True

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        equalized = m.weight_scaling == "equalized"
        self.latent_dim = m.latent_dim
        self.resolution = m.resolution
        self.first_layer = m.first_layer
        self.fc_channels = m.fc_channels
        self.cell_channels = m.cell_channels
        self.ties = m.sparsity_ties
        self.conv_sparsity_axis = m.conv_sparsity_axis
        self.layer_names = cfg.layer_names()
        fc_out = 16 * (m.cell_channels if m.first_layer == "cells" else m.fc_channels)
        self.fc = ScaledLinear(m.latent_dim, fc_out, equalized)
        self.blocks = conv_blocks(m.fc_channels, m.widths, m.convs_per_block, equalized)
        self.to_rgb = ScaledConv2d(m.widths[-1], 3, equalized, gain=1.0)
        self.k: dict[str, int | None] = {}
        self.set_sparsity({name: cfg.resolved_k(name) for name in self.layer_names})

    def set_sparsity(self, k: dict[str, int | None]) -> None:
        """Set the current k per layer (the sparsity schedule calls this as training progresses)."""
        self.k = {name: k.get(name) for name in self.layer_names}

    # -- forward ----------------------------------------------------------------------------------
    def _first_layer(self, z: torch.Tensor, return_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FC -> 4x4 map, ReLU, channel top-k. Returns the sparse map and, with ``return_mask``, its combined
        (ReLU * top-k) mask."""
        b = z.shape[0]
        pre = self.fc(z)
        if self.first_layer == "cells":
            # 3200 = cell_channels x 16 cells: cell p's value of slot v goes to channel v*16 + p at cell p,
            # the other 15 slots at that cell stay zero; top-k over the cell_channels of each cell.
            cells, active = relu_topk(pre.view(b, self.cell_channels, 16), self.k["fc4"], dim=1,
                                      ties=self.ties, return_mask=return_mask)
            sparse = torch.diag_embed(cells).reshape(b, self.fc_channels, 4, 4)  # (b, v, slot, cell)
            if not return_mask:
                return sparse, None
            return sparse, torch.diag_embed(active).reshape(b, self.fc_channels, 4, 4)
        return relu_topk(pre.view(b, self.fc_channels, 4, 4), self.k["fc4"], dim=1, ties=self.ties,
                         return_mask=return_mask)

    def forward(
        self, z: torch.Tensor, return_activations: bool = False, return_masks: bool = False
    ):
        """Images in [-1, 1], (B, 3, R, R). With ``return_activations``: (images, OrderedDict layer ->
        post-sparsity activation). With ``return_masks`` also the dict of combined ReLU/top-k masks that
        ``propagate`` needs (keys "fc4" and "blockI.convJ")."""
        activations: OrderedDict[str, torch.Tensor] = OrderedDict()
        masks: dict[str, torch.Tensor] = {}
        x, mask = self._first_layer(z, return_mask=return_masks)
        activations["fc4"] = x
        if return_masks:
            masks["fc4"] = mask
        for block_index, convs in enumerate(self.blocks):
            # (Dense on the meta device, where describe_layers runs shapes only and hooks every conv.)
            sparse_input = block_index == 0 and x.device.type != "meta" and self._sparse_first_conv_applies()
            for conv_index, conv in enumerate(convs):
                if conv_index > 0:
                    pre = conv(x)
                elif sparse_input:  # from fc4's active channels (it falls back to dense when they are many)
                    pre = sparse_conv.upsample_conv(conv, x, fused=self.fused_upsample_conv)
                else:
                    pre = upsample_conv.upsample_conv(conv, x, fused=self.fused_upsample_conv)
                if conv_index == len(convs) - 1:
                    k = self.k[self.layer_names[block_index + 1]]
                    if self.conv_sparsity_axis == "channel":
                        x, mask = relu_topk(pre, k, dim=1, ties=self.ties, return_mask=return_masks)
                    else:
                        x, mask = spatial_relu_topk(pre, k, self.ties, return_mask=return_masks)
                else:
                    x = F.relu(pre)
                    mask = (pre > 0).to(pre.dtype) if return_masks else None
                if return_masks:
                    masks[f"block{block_index}.conv{conv_index}"] = mask
            activations[self.layer_names[block_index + 1]] = x
        images = torch.tanh(self.to_rgb(x))
        if return_masks:
            return images, activations, masks
        if return_activations:
            return images, activations
        return images

    def _sparse_first_conv_applies(self) -> bool:
        """Whether fc4's map has few enough active channels per cell for the sparse first conv (at most k; at
        most cell_channels in the "cells" reading even when fc4 is dense)."""
        k = self.k["fc4"]
        if self.first_layer == "cells":
            k = self.cell_channels if k is None else min(k, self.cell_channels)
        return self.sparse_first_conv and k is not None and k <= sparse_conv.SPARSE_MAX_FRACTION * self.fc_channels

    def propagate(
        self,
        layer: str,
        activation: torch.Tensor,
        masks: dict[str, torch.Tensor],
        use_bias: bool = False,
        apply_tanh: bool = False,
    ) -> torch.Tensor:
        """Run the network from the output of ``layer`` with the ReLU/top-k masks of an earlier forward pass
        held fixed. With ``use_bias=False`` and ``apply_tanh=False`` the map is linear in ``activation``:
        a one-unit ``activation`` gives that unit's basis function in image space."""
        start = self.layer_names.index(layer)  # fc4 -> block 0 comes next
        x = activation
        for block_index in range(start, len(self.blocks)):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            for conv_index, conv in enumerate(self.blocks[block_index]):
                x = conv(x, use_bias=use_bias) * masks[f"block{block_index}.conv{conv_index}"]
        out = self.to_rgb(x, use_bias=use_bias)
        return torch.tanh(out) if apply_tanh else out


class EnergyCritic(nn.Module):
    """f(Y; Phi): bottom-up ConvNet mapping an image to a scalar energy (low = looks like data)."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        equalized = m.weight_scaling == "equalized"
        self.slope = m.leaky_relu_slope
        self.stem = ScaledConv2d(3, m.critic_first_width, equalized)
        self.blocks = conv_blocks(m.critic_first_width, m.critic_widths, m.critic_convs_per_block, equalized)
        self.head = ScaledLinear(m.critic_widths[-1] * 16, 1, equalized, gain=1.0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """f(Y) per image, shape (B,)."""
        x = F.leaky_relu(self.stem(y), self.slope)
        for convs in self.blocks:
            x = F.avg_pool2d(x, 2)
            for conv in convs:
                x = F.leaky_relu(conv(x), self.slope)
        return self.head(x.flatten(1)).squeeze(1)


def build_generator(cfg: Config) -> SparseGenerator:
    return SparseGenerator(cfg)


def build_critic(cfg: Config) -> EnergyCritic:
    return EnergyCritic(cfg)


def describe_layers(cfg: Config) -> dict[str, list[dict]]:
    """Name, output shape, k and parameter count of every layer of generator and critic (for --dry-run)."""
    generator, critic = build_generator(cfg), build_critic(cfg)
    described: dict[str, list[dict]] = {"generator": [], "critic": []}

    def record(kind: str, name: str, module: nn.Module, k=None):
        def hook(_module, _inputs, output):
            described[kind].append({
                "name": name,
                "output_shape": list(output.shape[1:]),
                "k": k,
                "parameters": sum(p.numel() for p in module.parameters()),
            })
        return module.register_forward_hook(hook)

    handles = [record("generator", "fc4", generator.fc, generator.k["fc4"])]
    for block_index, convs in enumerate(generator.blocks):
        layer = generator.layer_names[block_index + 1]
        for conv_index, conv in enumerate(convs):
            last = conv_index == len(convs) - 1
            handles.append(record("generator", f"{layer}.conv{conv_index}", conv, generator.k[layer] if last else None))
    handles.append(record("generator", "to_rgb", generator.to_rgb))
    handles.append(record("critic", "stem", critic.stem))
    for block_index, convs in enumerate(critic.blocks):
        for conv_index, conv in enumerate(convs):
            handles.append(record("critic", f"block{block_index}.conv{conv_index}", conv))
    handles.append(record("critic", "head", critic.head))
    with torch.no_grad():
        # Shapes only: run on the meta device, so describing paper64 allocates and computes nothing.
        images = generator.to("meta")(torch.zeros(1, cfg.model.latent_dim, device="meta"))
        critic.to("meta")(images)
    for handle in handles:
        handle.remove()
    # The FC output is a flat vector; report it as the 4x4 map it becomes.
    described["generator"][0]["output_shape"] = [cfg.model.fc_channels, 4, 4]
    return described
