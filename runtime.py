"""How this process runs the model, decided once at start-up: the precision (`--dtype auto` measures
whether bf16 is faster than fp32 here) and the allocator setting every CLI applies first
(`keep_freed_memory`). Measurements behind both: docs/performance.md.
"""
from __future__ import annotations

import ctypes
import math
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = ("auto", "bf16", "fp32")
_AUTO_DTYPE: dict[str, torch.dtype] = {}


def default_device() -> str:
    """The one device choice of every step that is not told one: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_of(name: str, device: str = "cpu") -> torch.dtype:
    """'bf16' | 'fp32' | 'auto' -> torch dtype. 'auto' = bf16 where this device's matmuls are faster
    in it: measured once per process on CPUs, because bf16 is much faster than fp32 with AMX or
    fast avx512_bf16 but SLOWER than fp32 on CPUs that emulate it (docs/performance.md)."""
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    kind = torch.device(device).type
    if kind not in _AUTO_DTYPE:
        if kind == "cuda":
            _AUTO_DTYPE[kind] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        else:
            _AUTO_DTYPE[kind] = torch.bfloat16 if _bf16_speedup() > 1.25 else torch.float32
    return _AUTO_DTYPE[kind]


def _bf16_speedup() -> float:
    """fp32 time / bf16 time of one small MLP + norm + attention step (a 135M model's shapes) at
    16 and 256 rows. One thread, interleaved rounds, best of each: with all threads, a busy machine's
    oversubscription swamps the difference; per-thread kernel speed is what the dtype changes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {}
    try:
        for rows in (16, 256):
            ws, x = [torch.randn(1536, 576), torch.randn(1536, 576), torch.randn(576, 1536)], torch.randn(rows, 576)
            pairs = {torch.float32: (x, ws), torch.bfloat16: (x.bfloat16(), [w.bfloat16() for w in ws])}
            for _ in range(5):
                for dt, (xx, (wg, wu, wd)) in pairs.items():
                    t = time.perf_counter()
                    for _ in range(3):
                        y = F.linear(F.silu(F.linear(xx, wg)) * F.linear(xx, wu), wd) + xx
                        y = y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dt)
                        q = y.view(1, rows, 9, 64).transpose(1, 2)
                        F.scaled_dot_product_attention(q, q, q, is_causal=True)
                    best[rows, dt] = min(best.get((rows, dt), math.inf), time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return sum(best[r, torch.float32] for r in (16, 256)) / sum(best[r, torch.bfloat16] for r in (16, 256))


MMAP_ABOVE = 256 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Why: glibc serves blocks above its mmap threshold (32 MB at most) with fresh mappings and unmaps
    them on free, so each training step's big activations and gradients (the [8, 128, 49152] fp32
    logits of a SoftSRV step alone are larger than that) come back as new pages the kernel must fault
    in and zero, every step. Keeping them makes the SoftSRV and fine-tuning steps faster and leaves
    decoding as it was (docs/performance.md, docs/perf/malloc.py). The cost: the process keeps its
    peak heap until it exits. True if applied; a no-op off Linux/glibc.
    """
    if sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):   # musl or another libc
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # Blocks up to MMAP_ABOVE come from the heap and go back to it, and the heap never shrinks. Larger
    # ones (a step's logits: [8, 145, 262144] fp32 on Gemma) keep their own mappings, returned on free:
    # in the heap, tensors that large and of a different size each step fragment it without bound
    # (measured in docs/performance.md: an SS_MC run on whole examples was OOM-killed).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)) & bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
