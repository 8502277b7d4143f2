"""The ensemble as one network: all members' weights stacked into grouped convolutions, and the
saliency backward written out by hand for all labels at once.

Member by member (the reference in ``ensemble.py``), PyTorch runs M small networks whose
convolutions have 2-8 channels, and autograd runs one backward pass through every member per label.
Both leave most of the machine idle. :class:`FusedEnsemble` computes the same numbers as follows.

Forward. The first convolution of every member reads the same input, so it is one convolution with
M x C1 output channels; later convolutions are grouped (one group per member); the dense heads are
batched matmuls over members. Activations are kept channels-last, ``[batch, length, channels]``: oneDNN
and cuDNN then convolve without converting layouts (for these channel counts the conversions cost
more than the arithmetic).

Saliency. The input gradient of the ensemble mean is linear in the output cotangents, so the K labels
go backward together as a batch of K cotangents over one forward's activations. In the forward, each
layer's max-pool argmax and LeakyReLU slope are folded into one label-independent multiplier
``S [b, pooled, pool, channels]``; the backward through pooling and activation is then one broadcast
multiply, and the transposed convolution is a grouped convolution with flipped kernels. The first
layer's transposed convolution sums over every member's channels (the ensemble mean comes for free);
with one output channel it is fastest as a matmul onto the k taps followed by a sum along diagonals.
Max-pool ties go to the first maximum, as in PyTorch, so the reference's subgradient is taken.

Memory. Spectra are processed in tiles sized to a byte budget, and the large backward buffers are
allocated once per tile size and reused: fresh multi-megabyte allocations are returned to the
operating system after each use and page-faulted back in, which costs more than the arithmetic. On a
CPU the first layer's backward (the largest tensors) runs in wavelength chunks that stay in L2.

Anything :func:`fusable` does not recognise (another layer type, padding, strides) is left to the
reference implementation; ``Ensemble`` also checks the fused numbers against the reference once when
it builds a fused engine.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speclabel.core.errors import ConfigError

PRECISIONS = ("float32", "tf32", "bf16")
# Bytes of intermediate data per tile. On a CPU the tile should stay in the caches and under glibc's
# largest recycled allocation (32 MiB); on a GPU it should be large enough to fill the device.
CPU_TILE_BYTES = 24 * 2**20
GPU_TILE_BYTES = 2 * 2**30
CPU_CHUNK_BYTES = 2**20
MAX_TILE = 1024


@dataclass
class _ConvLayer:
    weight: torch.Tensor  # [M*C_out, C_in per group, 1, k], channels-last
    bias: torch.Tensor  # [M*C_out]
    groups: int  # 1 for the first layer (every member reads the same input), M after it
    # Backward: the first layer keeps the depth-channel taps, flipped, [k, M*C_out]; later layers the
    # transposed convolution as a grouped convolution with flipped kernels, [M*C_in, C_out, 1, k].
    back: torch.Tensor
    kernel: int
    pool: int
    slope: float
    length: int  # convolution output length
    pooled: int  # pooled length

    @property
    def channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class _Branch:
    start: int  # the pixels this conv stack reads
    stop: int
    layers: list[_ConvLayer]
    members: int

    @property
    def features(self) -> int:
        """Flattened features per member."""
        last = self.layers[-1]
        return last.pooled * last.channels // self.members


@dataclass
class _Dense:
    weight: torch.Tensor  # [M, out, in]
    bias: torch.Tensor  # [M, 1, out]
    slope: float | None  # LeakyReLU after it; None for the output layer


def fusable(network: nn.Module) -> str | None:
    """Why ``network`` cannot be fused, or None when it can.

    The fused path understands :class:`~.arch.SpectrumCNN` built from plain layers: valid, unstrided,
    undilated convolutions with bias, LeakyReLU, max-pooling with stride = window, and a head of
    Linear / LeakyReLU / Dropout. Anything else is reported here and left to the reference.
    """
    from .arch import SpectrumCNN

    if type(network) is not SpectrumCNN:
        return f"{type(network).__name__} is not a SpectrumCNN"
    for branch in network.branches:
        modules = list(branch)
        if len(modules) % 3:
            return "a conv stack is not (Conv1d, LeakyReLU, MaxPool1d) repeated"
        for conv, act, pool in zip(modules[0::3], modules[1::3], modules[2::3], strict=True):
            if not (
                type(conv) is nn.Conv1d
                and conv.bias is not None
                and conv.stride == (1,)
                and conv.padding in ((0,), "valid")
                and conv.dilation == (1,)
                and conv.groups == 1
            ):
                return f"unsupported convolution {conv}"
            if type(act) is not nn.LeakyReLU:
                return f"unsupported activation {act}"
            if not (
                type(pool) is nn.MaxPool1d
                and _single(pool.stride) == _single(pool.kernel_size)
                and _single(pool.padding) == 0
                and _single(pool.dilation) == 1
                and not pool.ceil_mode
                and not pool.return_indices
            ):
                return f"unsupported pooling {pool}"
    kinds = [type(m) for m in network.head if type(m) is not nn.Dropout]
    if (
        not kinds
        or kinds[0] is not nn.Linear
        or kinds[-1] is not nn.Linear
        or any(k not in (nn.Linear, nn.LeakyReLU) for k in kinds)
    ):
        return "the head is not Linear layers with LeakyReLU between them"
    if any(a is b for a, b in itertools.pairwise(kinds)):
        return "the head has two Linear or two LeakyReLU layers in a row"
    return None


def fusable_ensemble(networks: Sequence[nn.Module]) -> str | None:
    """Why these member networks cannot be fused together, or None when they can.

    Besides each network being :func:`fusable`, the members must measure their input from the same
    reference spectrum (``center_input``): the fused first layer reads one input for all members.
    """
    reason = next((r for r in map(fusable, networks) if r), None)
    if reason:
        return reason
    first = networks[0].reference
    if any(not torch.equal(network.reference, first) for network in networks[1:]):
        return "the members measure their input from different reference spectra"
    return None


def _single(value) -> int:
    return value[0] if isinstance(value, tuple) else int(value)


class FusedEnsemble:
    """M member networks of one architecture as one network (see the module docstring).

    ``run(flux, good, label_weights)`` returns the scaled member outputs ``[M, b, K]``, when
    ``label_weights [K]`` is given ``sum_m label_weights[k] * d out[m, :, k] / d flux`` as
    ``[b, K, P]`` (zero at masked pixels), and with ``embed=True`` each member's penultimate-layer
    activations ``[M, b, U]`` (what the output layer reads; ``SpectrumCNN.embed``).
    ``precision``: ``float32`` (IEEE float32 also on GPUs, where cuDNN would otherwise use TF32),
    ``tf32`` (CUDA only) or ``bf16`` (weights and activations in bfloat16; convolutions and matmuls
    accumulate in float32).
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        *,
        device: str | torch.device = "cpu",
        precision: str = "float32",
        tile: int | None = None,
    ):
        if not networks:
            raise ConfigError("a fused ensemble needs at least one member network")
        reason = fusable_ensemble(networks)
        if reason:
            raise ConfigError(f"cannot fuse this ensemble: {reason}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.device = torch.device(device)
        if precision == "tf32" and self.device.type != "cuda":
            raise ConfigError("precision 'tf32' is a CUDA mode; use 'float32' or 'bf16' on a CPU")
        self.precision = precision
        first = networks[0]
        source_dtype = next(first.parameters()).dtype
        self.dtype = torch.bfloat16 if precision == "bf16" else source_dtype
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        # Outputs and saliency maps in the networks' own dtype (float64 for float64 networks).
        self.out_dtype = source_dtype
        self.n_members = len(networks)
        self.n_pixels = first.n_pixels
        self.mask_channel = first.arch.mask_channel
        # The input is reference - flux, zeroed at masked pixels. Masked flux arrives as 1.0 (see
        # core.arrays.model_inputs), so with the plain continuum reference the zeroing is free.
        reference = first.reference.detach()
        self.reference = None if bool((reference == 1).all()) else reference.to(self.device, source_dtype)
        with torch.no_grad():
            self.branches = [
                self._stack_branch(networks, index, start, stop)
                for index, (start, stop) in enumerate(first.branch_slices)
            ]
            self.head = self._stack_head(networks)
        self.n_outputs = self.head[-1].weight.shape[1]
        # Spectra per step, with and without saliency (the forward alone needs far less memory).
        self.tile = tile or self._auto_tile(saliency=True)
        self.forward_tile = tile or self._auto_tile(saliency=False)
        # Bytes of first-layer gradient expanded at a time: within a CPU core's L2 cache; a GPU has
        # nothing to gain from chunks and would pay for the launches.
        self.chunk_bytes = 2**62 if self.device.type == "cuda" else CPU_CHUNK_BYTES
        self._workspace = threading.local()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_workspace", "_pool")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._workspace = threading.local()

    # ---- building -------------------------------------------------------------------------------

    def _to(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device=self.device, dtype=self.dtype)

    def _stack_branch(self, networks, index: int, start: int, stop: int) -> _Branch:
        m = len(networks)
        stacks = [list(net.branches[index]) for net in networks]
        layers, length = [], stop - start
        for i in range(len(stacks[0]) // 3):
            convs = [s[3 * i] for s in stacks]
            weight = torch.cat([c.weight for c in convs])  # [M*C_out, C_in, k]
            c_out, c_in, kernel = convs[0].weight.shape
            if i == 0:
                back = weight[:, 0, :].flip(-1).T.contiguous()  # [k, M*C1], d/d depth: the mask is no input
            else:
                per_member = weight.view(m, c_out, c_in, kernel).transpose(1, 2)
                back = _conv2d_weight(per_member.reshape(m * c_in, c_out, kernel).flip(-1))
            pool = _single(stacks[0][3 * i + 2].kernel_size)
            conv_length = length - kernel + 1
            layers.append(
                _ConvLayer(
                    weight=self._to(_conv2d_weight(weight)),
                    bias=self._to(torch.cat([c.bias for c in convs])),
                    groups=1 if i == 0 else m,
                    back=self._to(back),
                    kernel=kernel,
                    pool=pool,
                    slope=float(stacks[0][3 * i + 1].negative_slope),
                    length=conv_length,
                    pooled=conv_length // pool,
                )
            )
            length = conv_length // pool
        return _Branch(start, stop, layers, members=m)

    def _stack_head(self, networks) -> list[_Dense]:
        modules = [[mod for mod in net.head if type(mod) is not nn.Dropout] for net in networks]
        dense = []
        for i, module in enumerate(modules[0]):
            if type(module) is not nn.Linear:
                continue
            weight = torch.stack([mods[i].weight for mods in modules])  # [M, out, in]
            if not dense:
                weight = self._channels_last_features(weight)
            follows = modules[0][i + 1] if i + 1 < len(modules[0]) else None
            dense.append(
                _Dense(
                    weight=self._to(weight).contiguous(),
                    bias=self._to(torch.stack([mods[i].bias for mods in modules]).unsqueeze(1)),
                    slope=None if follows is None else float(follows.negative_slope),
                )
            )
        return dense

    def _channels_last_features(self, weight: torch.Tensor) -> torch.Tensor:
        """Reorder the first dense layer's inputs from PyTorch's flatten order (channel, position)
        per branch to the channels-last order (position, channel) the fused activations have."""
        parts, offset = [], 0
        for branch in self.branches:
            last = branch.layers[-1]
            channels = last.channels // self.n_members
            block = weight[:, :, offset : offset + channels * last.pooled]
            m, out = block.shape[:2]
            parts.append(block.reshape(m, out, channels, last.pooled).transpose(2, 3).reshape(m, out, -1))
            offset += channels * last.pooled
        return torch.cat(parts, dim=2)

    def _auto_tile(self, *, saliency: bool) -> int:
        budget = GPU_TILE_BYTES if self.device.type == "cuda" else CPU_TILE_BYTES
        # At least 2 on a CPU: PyTorch does not give a batch of one spectrum to oneDNN.
        smallest = 1 if self.device.type == "cuda" else 2
        return max(smallest, min(MAX_TILE, budget // self.bytes_per_spectrum(saliency=saliency)))

    def bytes_per_spectrum(self, *, saliency: bool) -> int:
        """Bytes of the activations of one spectrum and, with saliency, of its multipliers and
        backward buffers (the first layer's expanded gradient only where it is not chunked)."""
        k, values = self.n_outputs, 0
        for branch in self.branches:
            for i, layer in enumerate(branch.layers):
                values += layer.length * layer.channels  # convolution output
                if not saliency:
                    continue
                values += layer.length * layer.channels  # multiplier
                if i > 0:
                    values += k * layer.length * layer.channels  # expanded gradient
                else:
                    values += layer.kernel * (layer.length + 2 * layer.kernel) * k  # per-tap sums
                    if self.device.type == "cuda":
                        values += k * layer.length * layer.channels
        return values * self.itemsize

    # ---- running --------------------------------------------------------------------------------

    def run(
        self,
        flux: torch.Tensor,
        good: torch.Tensor | None = None,
        label_weights: torch.Tensor | None = None,
        *,
        embed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Member outputs ``[M, B, K]``, with ``label_weights`` saliency ``[B, K, P]``, with ``embed``
        the penultimate activations ``[M, B, U]`` (see class); None for what was not asked."""
        if flux.ndim != 2 or flux.shape[1] != self.n_pixels:
            raise ValueError(f"expected flux [n, {self.n_pixels}], got {tuple(flux.shape)}")
        n = flux.shape[0]
        outs = torch.empty((self.n_members, n, self.n_outputs), dtype=self.out_dtype)
        grads = embeddings = None
        if embed:
            embeddings = torch.empty((self.n_members, n, self.head[-1].weight.shape[2]), dtype=self.out_dtype)
        if label_weights is not None:
            grads = torch.empty((n, self.n_outputs, self.n_pixels), dtype=self.out_dtype)
            label_weights = label_weights.to(device=self.device, dtype=self.dtype)
        tile = self.tile if label_weights is not None else self.forward_tile
        starts = range(0, n, tile)

        def run_tile(lo: int) -> None:
            hi = min(lo + tile, n)
            # The engine's dtypes are its precision: an enclosing autocast must not change them.
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, enabled=False),
                self._precision_flags(),
            ):
                x = flux[lo:hi].to(self.device, non_blocking=True)
                g = None if good is None else good[lo:hi].to(self.device, non_blocking=True)
                out, grad, penultimate = self._tile(x, g, label_weights)
                outs[:, lo:hi] = out.to("cpu", self.out_dtype)
                if grads is not None:
                    grads[lo:hi] = grad.to("cpu", self.out_dtype)
                if embeddings is not None:
                    embeddings[:, lo:hi] = self._network_order(penultimate).to("cpu", self.out_dtype)

        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        if threads == 1 or len(starts) == 1:
            for lo in starts:
                run_tile(lo)
            return outs, grads, embeddings
        # Several CPU threads: run that many tiles at once, one thread each, rather than split each
        # of a tile's ~100 small operations across the threads; no thread then waits for another at
        # every operation (OpenMP threads spin there, and lose most of their time on a busy machine).
        torch.set_num_threads(1)
        try:
            list(self._tile_pool(threads).map(run_tile, starts))
        finally:
            torch.set_num_threads(threads)
        return outs, grads, embeddings

    def _network_order(self, penultimate: torch.Tensor) -> torch.Tensor:
        """Penultimate activations in the order of ``SpectrumCNN.embed``: a head without hidden
        layers reads the conv features, which the fused engine keeps channels-last per branch."""
        if len(self.head) > 1:
            return penultimate
        m, b, parts, offset = self.n_members, penultimate.shape[1], [], 0
        for branch in self.branches:
            pooled, width = branch.layers[-1].pooled, branch.features
            block = penultimate[:, :, offset : offset + width].reshape(m, b, pooled, width // pooled)
            parts.append(block.transpose(2, 3).reshape(m, b, width))
            offset += width
        return torch.cat(parts, dim=2)

    def _tile_pool(self, threads: int) -> ThreadPoolExecutor:
        """Worker threads that live as long as the engine, so that their buffers are reused."""
        size, pool = getattr(self, "_pool", (0, None))
        if size != threads:
            if pool is not None:
                pool.shutdown()
            pool = ThreadPoolExecutor(threads, thread_name_prefix="fused-tile")
            self._pool = (threads, pool)
        return pool

    @contextlib.contextmanager
    def _precision_flags(self) -> Iterator[None]:
        """IEEE float32 on CUDA unless tf32 was asked for (cuDNN convolutions default to TF32)."""
        if self.device.type != "cuda":
            yield
            return
        mode = "tf32" if self.precision == "tf32" else "ieee"
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision, conv.fp32_precision = mode, mode
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved

    def _tile(self, flux: torch.Tensor, good: torch.Tensor | None, label_weights: torch.Tensor | None):
        b = flux.shape[0]
        # Depth before any cast to bf16: near the continuum it keeps its relative precision.
        if self.reference is None:
            depth = 1.0 - flux
        else:
            depth = self.reference - flux
            if good is not None:
                depth = depth * good
        depth = depth.to(self.dtype).unsqueeze(-1)
        if self.mask_channel:
            mask = torch.ones_like(depth) if good is None else good.to(self.dtype).unsqueeze(-1)
            depth = torch.cat([depth, mask], dim=-1)
        saliency = label_weights is not None
        features, saved = [], []
        for index, branch in enumerate(self.branches):
            h = depth[:, branch.start : branch.stop]
            multipliers = []
            for i, layer in enumerate(branch.layers):
                z = _from_conv(
                    F.conv2d(_conv2d_input(h), layer.weight, layer.bias, groups=layer.groups)
                ).contiguous()
                windows = z[:, : layer.pooled * layer.pool].view(b, layer.pooled, layer.pool, -1)
                if not saliency:
                    # LeakyReLU is monotone, so it commutes with the max: apply it to the pooled half.
                    h = F.leaky_relu_(_max_over_windows(windows), layer.slope)
                    continue
                # With saliency, pool after the activation as the network does, so that ties
                # between activations are the network's ties.
                F.leaky_relu_(z, layer.slope)
                h = _max_over_windows(windows)
                multiplier = self._buffer(("S", index, i), (b, layer.pooled, layer.pool, layer.channels))
                _pool_and_slope_multiplier(windows, h, layer.slope, out=multiplier)
                multipliers.append(multiplier)
            saved.append(multipliers)
            m = self.n_members
            features.append(h.view(b, h.shape[1], m, -1).permute(2, 0, 1, 3).reshape(m, b, -1))
        x = torch.cat(features, dim=2) if len(features) > 1 else features[0]
        activations = []
        for dense in self.head:
            penultimate = x  # the output layer's input, after the loop
            x = torch.baddbmm(dense.bias, x, dense.weight.transpose(1, 2))
            if dense.slope is not None:
                F.leaky_relu_(x, dense.slope)
                activations.append(x)
        if not saliency:
            return x, None, penultimate
        return x, self._saliency(b, label_weights, saved, activations, good), penultimate

    def _saliency(self, b, label_weights, saved, activations, good) -> torch.Tensor:
        m, k = self.n_members, self.n_outputs
        last = self.head[-1].weight  # [M, K, U]
        g = (last * label_weights[None, :, None]).unsqueeze(1)  # [M, 1, K, U]: same for every spectrum
        for dense, act in zip(reversed(self.head[:-1]), reversed(activations), strict=True):
            slope = _leaky_derivative(act, dense.slope).unsqueeze(2)  # [M, b, 1, U]
            g = (g * slope).view(m, b * k, -1)
            g = torch.bmm(g, dense.weight).view(m, b, k, -1)
        g = g.expand(m, b, k, g.shape[-1])
        grads = torch.empty((b, k, self.n_pixels), dtype=self.dtype, device=self.device)
        offset = 0
        for index, branch in enumerate(self.branches):
            last_layer = branch.layers[-1]
            width = branch.features
            gb = g[..., offset : offset + width].reshape(m, b, k, last_layer.pooled, -1)
            gb = gb.permute(1, 2, 3, 0, 4).reshape(b * k, last_layer.pooled, last_layer.channels)
            offset += width
            for i in reversed(range(len(branch.layers))):
                gb = self._layer_backward(index, i, branch.layers[i], gb, saved[index][i], b, grads, branch)
        if good is not None:  # no label was read from masked pixels
            grads *= good.to(grads.dtype).unsqueeze(1)
        return grads

    def _layer_backward(self, index, i, layer, g_pooled, multiplier, b, grads, branch):
        """Backward through layer ``i`` (pool, LeakyReLU, conv) for K cotangents per spectrum.

        ``g_pooled [b*K, pooled, C]``: gradient w.r.t. the layer's pooled output. Returns the gradient
        w.r.t. its input in the same layout, or, for the first layer, subtracts the depth gradient
        from ``grads``.
        """
        k, m, c = self.n_outputs, self.n_members, layer.channels
        taps, windows = layer.kernel, (layer.pooled, layer.pool)
        if i > 0:
            buffer = self._buffer(("G", index, i), (b, k, layer.length, c), zero=True)
            expanded = buffer[:, :, : layer.pooled * layer.pool].view(b, k, *windows, c)
            torch.mul(g_pooled.view(b, k, layer.pooled, 1, c), multiplier.unsqueeze(1), out=expanded)
            # The transposed grouped convolution as a "full" convolution with flipped kernels.
            flat = buffer.view(b * k, layer.length, c)
            back = F.conv2d(_conv2d_input(flat), layer.back, padding=(0, taps - 1), groups=m)
            return _from_conv(back).contiguous()
        # First layer, in wavelength chunks sized to stay in cache: the expanded gradient of a chunk
        # is written and read back by the matmul before it leaves L2. One output channel:
        # per_tap[j, r] = sum_c w[c, k-1-j] g[r, c], tap-major, rows r with k-1 zero rows on both
        # ends; the depth gradient at pixel p then sums per_tap[j, p + j] over j.
        rows = layer.length + 2 * (taps - 1)
        per_tap = self._buffer(("T", index), (taps, rows, b, k), zero=True)
        chunk = max(1, self.chunk_bytes // (layer.pool * b * k * c * self.itemsize))
        scratch = self._buffer(("X", index), (min(chunk, layer.pooled), layer.pool, b, k, c))
        g_rows = g_pooled.view(b, k, layer.pooled, c).permute(2, 0, 1, 3).unsqueeze(1)  # [Lp, 1, b, K, C]
        s_rows = multiplier.permute(1, 2, 0, 3).unsqueeze(3)  # [Lp, pool, b, 1, C]
        for q0 in range(0, layer.pooled, chunk):
            q1 = min(q0 + chunk, layer.pooled)
            expanded = scratch[: q1 - q0]
            torch.mul(g_rows[q0:q1], s_rows[q0:q1], out=expanded)
            r0 = taps - 1 + q0 * layer.pool
            target = per_tap[:, r0 : r0 + (q1 - q0) * layer.pool].view(taps, -1)
            torch.matmul(layer.back, expanded.view(-1, c).T, out=target)
        # Sum over taps as shifted, contiguous slices (a strided reduction is several times slower).
        n_in = branch.stop - branch.start
        depth_grad = per_tap[0, :n_in].clone()  # [n_in, b, K]
        for j in range(1, taps):
            depth_grad += per_tap[j, j : j + n_in]
        # d/d flux = -d/d depth, depth = reference - flux. The branches cover every pixel once.
        torch.neg(depth_grad.permute(1, 2, 0), out=grads[:, :, branch.start : branch.stop])
        return None

    def _buffer(self, key, shape, *, zero: bool = False) -> torch.Tensor:
        """A reused work buffer. ``zero``: allocated zeroed; callers write only rows that they also
        wrote the previous time, so the rows they leave alone stay zero."""
        store = getattr(self._workspace, "buffers", None)
        if store is None:
            store = self._workspace.buffers = {}
        key = (*key, shape)
        if key not in store:
            if len(store) > 64:  # many distinct tile sizes: do not hoard memory
                store.clear()
            make = torch.zeros if zero else torch.empty
            store[key] = make(shape, dtype=self.dtype, device=self.device)
        return store[key]


def _conv2d_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, k] -> [O, I, 1, k] in channels-last memory, the layout the activations have."""
    return weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def _conv2d_input(x: torch.Tensor) -> torch.Tensor:
    """[b, L, C] -> a channels-last [b, C, 1, L] view (a copy only if ``x`` is a strided slice)."""
    return x.contiguous().transpose(1, 2).unsqueeze(2)


def _from_conv(y: torch.Tensor) -> torch.Tensor:
    """[b, C, 1, L] -> [b, L, C]."""
    return y.squeeze(2).transpose(1, 2)


def _max_over_windows(windows: torch.Tensor) -> torch.Tensor:
    """Max over the pooling windows ``[b, Lp, pool, C] -> [b, Lp, C]``."""
    if windows.shape[2] == 1:
        return windows[:, :, 0]
    pooled = torch.maximum(windows[:, :, 0], windows[:, :, 1])
    for o in range(2, windows.shape[2]):
        torch.maximum(pooled, windows[:, :, o], out=pooled)
    return pooled


def _leaky_derivative(x: torch.Tensor, slope: float) -> torch.Tensor:
    """LeakyReLU's derivative at ``x`` (post-activation has the sign of pre-activation): 1 where
    ``x > 0``, else ``slope``. Written with a float-valued comparison: PyTorch's boolean tensors
    and ``where`` are several times slower on a CPU than plain float arithmetic."""
    derivative = torch.empty_like(x)
    torch.gt(x, 0, out=derivative)  # 1.0 or 0.0
    if slope <= 1.0:
        return derivative.clamp_(min=slope)
    return derivative.mul_(1.0 - slope).add_(slope)


def _pool_and_slope_multiplier(windows, pooled, slope: float, *, out: torch.Tensor) -> None:
    """``out[b, q, o, c]``: the LeakyReLU derivative at the maximum if position o is the first
    maximum of window q (PyTorch's tie rule), else 0."""
    pool = windows.shape[2]
    if pool == 2:
        torch.gt(windows[:, :, 1], windows[:, :, 0], out=out[:, :, 1])  # ties go to the first
        torch.sub(1.0, out[:, :, 1], out=out[:, :, 0])
    elif pool > 2:
        unclaimed = torch.ones_like(pooled)
        for o in range(pool - 1):
            torch.eq(windows[:, :, o], pooled, out=out[:, :, o])
            out[:, :, o].mul_(unclaimed)
            unclaimed.sub_(out[:, :, o])
        out[:, :, pool - 1] = unclaimed
    else:
        out.fill_(1.0)
    out.mul_(_leaky_derivative(pooled, slope).unsqueeze(2))
