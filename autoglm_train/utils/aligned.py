"""Tensors held in storage this process allocated (64-byte aligned), for CPU kernels that assume it.

Why: PyTorch's weight-only int8 CPU kernel (``aten._weight_int8pack_mm``, the one the server's
``--quantize int8`` runs) faults on AVX-512 hosts when its weight is not 64-byte aligned: a general
protection fault in libtorch_cpu.so that takes the whole process down. Tensors read from a safetensors
file (mmap'd or copied by ``from_pretrained``) are only 8-byte aligned, and ``.contiguous()`` does not copy a
tensor that is already contiguous, so a loaded weight reached the kernel as it lay in the file. AVX2 hosts
never showed it, which is why it went unseen until the tests ran on an AVX-512 EPYC.

PyTorch's CPU allocator aligns every allocation to 64 bytes (``c10::alloc_cpu``, ``gAlignment``), so a copy
into a fresh tensor is enough; :func:`aligned` copies only what is misaligned, once, at load time.

This looks like PyTorch's bug rather than documented behaviour (the op states no alignment requirement and
its AVX2 path takes any alignment). Minimal reproduction, torch 2.13.0+cpu, ``get_cpu_capability() ==
"AVX512"``, no project code::

    import torch
    x = torch.randn(4, 32).bfloat16()
    w = torch.randint(-127, 127, (32 * 32 + 8,), dtype=torch.int8)[8:].view(32, 32)  # data_ptr % 64 == 8
    s = torch.rand(32).bfloat16()
    torch._weight_int8pack_mm(x, w, s)   # segfault; fine with offset 0, 16 or 32, and with 1 row

Measured here (AMD EPYC, AVX512): weights at offsets 8, 24, 40 and 56 mod 64 fault, at 32x32, 48x64 and 64x64;
16-byte aligned ones do not. 64 bytes is asked for because that is what the allocator gives anyway and what
any AVX-512 kernel may assume.
"""

from __future__ import annotations

from torch import Tensor

ALIGNMENT = 64
"""Bytes: a cache line, and the widest vector load (AVX-512) a CPU kernel may assume."""


def is_aligned(tensor: Tensor) -> bool:
    """Whether ``tensor``'s first element starts on an :data:`ALIGNMENT`-byte boundary."""
    return tensor.data_ptr() % ALIGNMENT == 0


def aligned(tensor: Tensor) -> Tensor:
    """``tensor`` contiguous and :data:`ALIGNMENT`-byte aligned: itself when it already is, else a fresh copy.

    CPU only; tensors on other devices are returned as they are (their allocators align on their own terms).
    """
    if tensor.device.type != "cpu":
        return tensor
    if tensor.is_contiguous() and is_aligned(tensor):
        return tensor
    fresh = tensor.new_empty(tensor.shape)  # the CPU allocator's own, 64-byte aligned storage
    fresh.copy_(tensor)
    return fresh
