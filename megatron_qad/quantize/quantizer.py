"""TensorQuantizer: fake-quantizes one tensor role of one layer (its weight, its input, or K / V).

A quantizer owns the amax its scale comes from:
  * ``dynamic``: max |x| of each call, MAX-reduced over ``group`` (the tensor-parallel group of the
    layer, so that a tensor split over ranks is scaled as the whole tensor would be);
  * ``static``: the ``amax`` buffer, set by calibration (max over batches, MAX-reduced over the
    tensor- and data-parallel groups) and saved in checkpoints.
Weights are always dynamic: they change at every optimizer step. Between two steps they do not, so
a weight quantizer can *hold* its result (:meth:`TensorQuantizer.start_holding`): the first call of
a step fake-quantizes, later micro-batches reuse that tensor with a straight-through gradient. The
numerics are in :mod:`megatron_qad.numerics`; this module only chooses the amax.
"""

import torch
import torch.distributed as dist

from ..numerics import fp8, nvfp4
from ..numerics.amax import absolute_max
from ..numerics.straight_through import straight_through

TENSOR_FORMATS = ("nvfp4", "nvfp4_4over6", "fp8")


def tensor_key(x: torch.Tensor) -> tuple:
    """What identifies a weight between two calls of one optimizer step: its storage and layout."""
    return (x.data_ptr(), x.shape, x.dtype, x.device)


def _local_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 0-d tensor; 0 for an empty ``x`` (an expert that received no tokens)."""
    with torch.no_grad():
        return absolute_max(x.detach())


class TensorQuantizer(torch.nn.Module):
    """Fake quantization of one tensor to ``fmt`` (``nvfp4``, ``nvfp4_4over6`` or ``fp8``).

    amax_mode: "dynamic" or "static" (see the module doc). tp_group: the layer's tensor-parallel
    group, over which every amax is MAX-reduced (None: no reduction); dp_group: the group of its
    data-parallel replicas, over which calibrated amaxes are reduced too. owner: a name for error
    messages. Static quantizers have an ``amax`` buffer (fp32 0-d, NaN until calibrated or loaded)
    on ``device`` (the layer's: it takes part in the layer's collectives);
    a checkpoint without it (a BF16 checkpoint) leaves it as is.
    """

    def __init__(self, fmt: str, amax_mode: str, tp_group=None, dp_group=None, owner: str = "",
                 device: torch.device | str | None = None):
        super().__init__()
        if fmt not in TENSOR_FORMATS:
            raise ValueError(f"TensorQuantizer format must be one of {TENSOR_FORMATS}, got {fmt!r}")
        if amax_mode not in ("dynamic", "static"):
            raise ValueError(f"amax_mode must be 'dynamic' or 'static', got {amax_mode!r}")
        self.fmt = fmt
        self.amax_mode = amax_mode
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.owner = owner
        self.calibrating = False
        self.holding = False
        self._held: tuple[tuple, object] | None = None  # (key of the input, its fake quant)
        self.amax_ready = False  # static: set by calibration or by loading a checkpoint that has it
        if amax_mode == "static":
            self.register_buffer("amax", torch.tensor(float("nan"), device=device))

    def extra_repr(self) -> str:
        return f"{self.fmt}, amax={self.amax_mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            if self.amax_mode == "static":
                self._observe(x)
            return x
        if self.holding:
            return straight_through(x, self._held_fake_quant)
        return self._fake_quantize(x, self.current_amax(x))

    def _held_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The fake quant of ``x`` made at the first call since :meth:`start_holding` (made now if
        ``x`` is another tensor than that one), as a fresh alias without autograd history."""
        return self.hold(tensor_key(x), lambda: self._fake_quantize(x.detach(), self.current_amax(x))).detach()

    def hold(self, key: tuple, make):
        """While holding: the value ``make()`` (called without autograd) returned at the first call
        with ``key`` since :meth:`start_holding`; made again, and kept, for another key."""
        if self._held is None or self._held[0] != key:
            with torch.no_grad():
                self._held = (key, make())
        return self._held[1]

    def start_holding(self) -> None:
        """Until :meth:`stop_holding`, fake-quantize the input once and reuse the result: only for
        an input that does not change in between (a weight within one optimizer step)."""
        self.holding = True

    def stop_holding(self) -> None:
        """Forget the held tensor and fake-quantize every call again."""
        self.holding = False
        self._held = None

    def _fake_quantize(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp8":
            return fp8.fake_quantize_e4m3(x, amax)
        return nvfp4.fake_quantize(x, amax, four_over_six=self.fmt == "nvfp4_4over6", check_finite=False)

    def current_amax(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 0-d amax this quantizer scales ``x`` with (a collective when dynamic under TP)."""
        if self.amax_mode == "static":
            return self.static_amax()
        return self._reduce_max(_local_amax(x), (self.tp_group,))

    def static_amax(self) -> torch.Tensor:
        """The calibrated amax as an fp32 0-d tensor (``amax_mode`` static)."""
        if not self.amax_ready:
            raise RuntimeError(
                f"{self.owner}: the static {self.fmt} amax is not calibrated; run "
                f"megatron_qad.quantize.calibrate(model, batches) first, load a checkpoint that "
                f"has it, or use quantization.input_amax: dynamic")
        return self.amax.float()  # the buffer follows a model cast (``model.bfloat16()``)

    def _observe(self, x: torch.Tensor) -> None:
        self.amax.copy_(torch.fmax(self.amax, _local_amax(x)))  # fmax: the NaN start value loses

    def start_calibration(self) -> None:
        """Pass inputs through unquantized; a static quantizer also forgets its amax and records
        max |x| of the coming forward passes."""
        self.calibrating = True
        if self.amax_mode == "static":
            self.amax.fill_(float("nan"))
            self.amax_ready = False

    def finish_calibration(self) -> None:
        """Stop watching; MAX-reduce the observed amax over all groups (every rank must call this)."""
        self.calibrating = False
        observed = torch.nan_to_num(self.amax, nan=0.0)  # a rank whose layer saw no tokens
        self.amax.copy_(self._reduce_max(observed, (self.tp_group, self.dp_group)))
        self.amax_ready = True

    @staticmethod
    def _reduce_max(amax: torch.Tensor, groups) -> torch.Tensor:
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        return amax

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint written before quantization (BF16) has no amax: keep ours, report nothing missing.
        if prefix + "amax" not in state_dict:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.amax_ready = not bool(torch.isnan(self.amax))  # a checkpoint saved before calibration
