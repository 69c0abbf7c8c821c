"""Tests for runtime.py: the precision `--dtype auto` picks, and the allocator setting every CLI applies."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402


def test_dtype_of_auto_follows_the_measured_speed(monkeypatch):
    assert runtime.dtype_of("bf16") == torch.bfloat16 and runtime.dtype_of("fp32") == torch.float32
    for speedup, want in ((3.0, torch.bfloat16), (0.6, torch.float32)):
        monkeypatch.setattr(runtime, "_AUTO_DTYPE", {})
        monkeypatch.setattr(runtime, "_bf16_speedup", lambda s=speedup: s)
        assert runtime.dtype_of("auto") == want
        monkeypatch.setattr(runtime, "_bf16_speedup", lambda: 1 / 0)     # measured once per process
        assert runtime.dtype_of("auto", "cpu") == want
    monkeypatch.setattr(runtime, "_AUTO_DTYPE", {})
    monkeypatch.undo()
    threads = torch.get_num_threads()
    assert 0.05 < runtime._bf16_speedup() < 50 and torch.get_num_threads() == threads   # restored


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    # A 64 MB tensor, allocated and freed again and again (a training step's activations): glibc
    # maps it afresh each time (16K zero-filled page faults) unless keep_freed_memory() made it keep
    # the blocks; then, after the rounds that grow the heap (how many depends on what the process
    # allocated before), no faults at all. Each case in its own process.
    code = ("import resource, sys; sys.path.insert(0, %r); import torch, runtime\n"
            "applied = runtime.keep_freed_memory() if sys.argv[1] == 'keep' else False\n"
            "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for i in range(16):\n"
            "    if i == 12: f = faults()   # the last 4 rounds count\n"
            "    x = torch.ones(64 << 20, dtype=torch.uint8); del x\n"
            "print(applied, (faults() - f) // 4)" % str(ROOT))
    got = {}
    for case in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        applied, faults = out.stdout.split()
        got[case] = (applied == "True", int(faults))
    if not got["keep"][0]:
        pytest.skip("not glibc")
    assert got["default"][1] > 10_000 and got["keep"][1] < 1_000, got


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_keep_freed_memory_returns_blocks_above_its_bound():
    # Blocks larger than runtime.MMAP_ABOVE (a step's logits on a large vocabulary, a different size
    # each step) go back to the OS when freed: kept in the heap, they fragmented it until a run was
    # killed for memory. After freeing 320 MB, the resident set is back near where it was.
    code = ("import sys; sys.path.insert(0, %r); import torch, runtime\n"
            "assert runtime.keep_freed_memory()\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
            "before = rss()\n"
            "x = torch.ones(320 << 20, dtype=torch.uint8); del x\n"
            "print(rss() - before)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "AssertionError" in out.stderr:
        pytest.skip("not glibc")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 64, f"{out.stdout.strip()} MB still resident after the free"
