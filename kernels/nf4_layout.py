"""NF4 layouts: bitsandbytes' packed 4-bit weight and quant state, as the kernel reads them.

``nf4_layout(weight, quant_state)`` validates a bitsandbytes ``Params4bit`` /
``QuantState`` pair (NF4, any power-of-two blocksize, plain or double-quantized absmax)
and returns an ``NF4Layout`` of the tensors and sizes the NF4 matmul kernels
(``kernels/nf4_matmul.py``) read, cached per quant state; ``kernel_unsupported_reason``
says why a valid layout is still not one the kernel reads. The byte and scale layout is
described in docs/kernels.md, "The layout read".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lowmem_es.kernels._runtime import INT32_LIMIT

__all__ = ["NF4_CODE", "NF4Layout", "kernel_unsupported_reason", "nf4_layout"]

# The 16 NF4 values of bitsandbytes' get_4bit_type("nf4"), as exact fp32 numbers (the
# select tree in kernels/nf4_matmul.py's _nf4_value hard-codes the same literals).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


@dataclass(frozen=True)
class NF4Layout:
    """The tensors and sizes the kernel reads, taken from a bitsandbytes quant state.

    ``packed`` uint8 (N*K/2,); ``absmax`` fp32 (blocks,), or uint8 when ``nested`` with
    ``absmax2`` fp32, ``code2`` fp32 (256,) and ``offset`` fp32 (1,) describing it;
    ``code`` fp32 (16,). ``standard_code``: ``code`` equals ``NF4_CODE`` exactly, so the
    select tree may replace the table load.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    code: torch.Tensor
    out_features: int
    in_features: int
    blocksize: int
    nested_blocksize: int
    standard_code: bool

    @property
    def nested(self) -> bool:
        """Whether ``absmax`` is double-quantized (uint8 indices into ``code2``)."""
        return self.absmax2 is not None


# id(quant state) -> (weak reference to it, identity key, layout). QuantState defines
# __eq__ and so is unhashable: keyed by id, with the weak reference guarding against a
# reused id and its callback dropping the entry when the quant state is freed.
_LAYOUTS: dict[int, tuple[weakref.ref, tuple, NF4Layout]] = {}


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _layout_key(weight: torch.Tensor, quant_state) -> tuple:
    state2 = getattr(quant_state, "state2", None)
    return (weight.data_ptr(), weight.device, quant_state.absmax.data_ptr(),
            quant_state.absmax.device, None if state2 is None else state2.absmax.data_ptr(),
            tuple(quant_state.shape), quant_state.blocksize, quant_state.quant_type,
            bool(getattr(quant_state, "packing_format_for_cpu", False)))


def nf4_layout(weight: torch.Tensor, quant_state) -> NF4Layout:
    """Validate ``(weight, quant_state)`` from bitsandbytes and return what the kernel reads.

    Built once per quant state and cached (keyed on the tensors' storage, so a move to
    another device or a re-quantization rebuilds it); the first build reads the 16-entry
    code on the host (one device sync). Raises ValueError/TypeError naming the field for
    anything that is not bitsandbytes' NF4 layout.
    """
    if quant_state is None:
        raise ValueError("`quant_state` is None: `weight` is not quantized (load the layer "
                         "with bitsandbytes 4-bit and move it to its device first)")
    key = _layout_key(weight, quant_state)
    ident = id(quant_state)
    cached = _LAYOUTS.get(ident)
    if cached is not None and cached[0]() is quant_state and cached[1] == key:
        return cached[2]
    layout = _build_layout(weight, quant_state)
    _LAYOUTS[ident] = (weakref.ref(quant_state, lambda _ref, i=ident: _drop_layout(i, _ref)),
                       key, layout)
    return layout


def _drop_layout(ident: int, ref: weakref.ref) -> None:
    entry = _LAYOUTS.get(ident)
    if entry is not None and entry[0] is ref:
        del _LAYOUTS[ident]


def _build_layout(weight: torch.Tensor, quant_state) -> NF4Layout:
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("`quant_state.packing_format_for_cpu` is set: bitsandbytes repacked "
                         "this weight for its AVX512 CPU kernel, a layout the NF4 kernel "
                         "does not read; use the torch path (force='torch')")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"`quant_state.quant_type` is {quant_state.quant_type!r}; the kernel "
                         "reads NF4 only (quantize with quant_type='nf4')")
    shape = tuple(quant_state.shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"`quant_state.shape` is {shape}; expected (out_features, "
                         "in_features) with both >= 1")
    n, k = shape
    blocksize = int(quant_state.blocksize)
    if not _is_pow2(blocksize):
        raise ValueError(f"`quant_state.blocksize` is {blocksize}; expected a power of two")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_contiguous():
        raise ValueError(f"`weight` must be contiguous (packed bytes in row-major order), got "
                         f"strides {tuple(weight.stride())}")
    packed = weight.reshape(-1).view(torch.uint8)
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"`weight` holds {packed.numel()} bytes but `quant_state.shape` "
                         f"{shape} packs into {(n * k + 1) // 2}")
    device = weight.device
    code = quant_state.code
    if code is None or code.numel() != 16:
        raise ValueError("`quant_state.code` must hold the 16 NF4 values, got "
                         f"{None if code is None else tuple(code.shape)}")
    code = code.to(device, torch.float32).contiguous()
    standard = bool(torch.equal(code.cpu(), torch.tensor(NF4_CODE, dtype=torch.float32)))
    blocks = -(-n * k // blocksize)
    absmax = quant_state.absmax
    if absmax.numel() != blocks or absmax.device != device:
        raise ValueError(f"`quant_state.absmax` has {absmax.numel()} entries on "
                         f"{absmax.device}; expected {blocks} (one per {blocksize} weights) "
                         f"on {device}, the device of `weight`")
    absmax2 = code2 = offset = None
    nested_blocksize = 1
    if quant_state.nested:
        state2 = quant_state.state2
        if absmax.dtype != torch.uint8:
            raise TypeError(f"`quant_state.absmax` has dtype {absmax.dtype}; a nested "
                            "(double-quantized) state stores uint8 indices")
        nested_blocksize = int(state2.blocksize)
        if not _is_pow2(nested_blocksize):
            raise ValueError(f"`quant_state.state2.blocksize` is {nested_blocksize}; "
                             "expected a power of two")
        if state2.absmax.numel() != -(-blocks // nested_blocksize):
            raise ValueError(f"`quant_state.state2.absmax` has {state2.absmax.numel()} "
                             f"entries; expected {-(-blocks // nested_blocksize)}")
        if state2.code is None or state2.code.numel() != 256:
            raise ValueError("`quant_state.state2.code` must hold 256 values")
        absmax2 = state2.absmax.to(device, torch.float32).contiguous()
        code2 = state2.code.to(device, torch.float32).contiguous()
        offset = torch.as_tensor(quant_state.offset).to(device, torch.float32).reshape(1)
        absmax = absmax.contiguous()
    else:
        absmax = absmax.to(torch.float32).contiguous()
    return NF4Layout(packed, absmax, absmax2, code2, offset, code, n, k, blocksize,
                     nested_blocksize, standard)


def kernel_unsupported_reason(layout: NF4Layout) -> str | None:
    """Why the kernel cannot read this layout (a message naming the field), or None."""
    if layout.in_features % layout.blocksize:
        return (f"`weight` has in_features={layout.in_features}, not a multiple of "
                f"`quant_state.blocksize`={layout.blocksize}: quantization blocks would "
                "cross rows, which the kernel does not read")
    if layout.packed.numel() >= INT32_LIMIT:
        return (f"`weight` has {layout.packed.numel()} packed bytes, more than the kernel's "
                "int32 offsets hold")
    return None
