"""Sweep the launch parameters of the NVFP4 Triton kernels on the current GPU (8192 x 8192 bf16).

    python benchmarks/sweep_nvfp4_kernels.py

Prints, fastest first, the median GPU time (CUDA-graph replay, so host overhead is excluded) of
configuration of the quantize kernel (plain and Four Over Six), and of the tensor-amax reductions:
torch's vector_norm (ord=inf), the two-launch Triton one of numerics/amax_triton.py (per-program
partial maxima plus one reduction; numerics/amax.py picks between the two by size) and a persistent
kernel with one atomic max per program; and the
host time of one fake_quantize call. The defaults in megatron_qad/numerics come from it.
"""

import itertools
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from megatron_qad.numerics import amax_triton, nvfp4, nvfp4_torch, nvfp4_triton


@triton.jit
def _atomic_abs_max_kernel(x_ptr, amax_ptr, n_elements, n_tiles, TILE: tl.constexpr):
    acc = tl.zeros([TILE], dtype=tl.float32)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        offsets = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
        magnitude = tl.abs(tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(tl.float32))
        acc = tl.maximum(acc, tl.where(magnitude == magnitude, magnitude, float("inf")))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


def atomic_amax(x, tile, programs_per_sm, warps):
    amax = torch.zeros(1, dtype=torch.float32, device=x.device)
    n_tiles = triton.cdiv(x.numel(), tile)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(n_tiles, sms * programs_per_sm),)
    _atomic_abs_max_kernel[grid](x, amax, x.numel(), n_tiles, TILE=tile, num_warps=warps)
    return amax


def graph_ms(fn) -> float:
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def host_us(fn, calls=200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main():
    torch.manual_seed(0)
    x = torch.randn(8192 * 8192, device="cuda", dtype=torch.bfloat16)
    amax = x.abs().amax().float().reshape(1)
    assert torch.equal(amax_triton.absolute_max(x).reshape(1), amax) and torch.equal(atomic_amax(x, 8192, 8, 8), amax)
    assert torch.equal(nvfp4_torch.absolute_max(x).reshape(1), amax)
    rows = [("amax torch vector_norm (used below amax.TRITON_MIN_ELEMENTS)", graph_ms(lambda: nvfp4_torch.absolute_max(x)))]
    for tile, per_sm, warps in itertools.product((4096, 16384), (4, 16), (8,)):
        rows.append((f"amax atomic tile={tile} per_sm={per_sm} warps={warps}",
                     graph_ms(lambda: atomic_amax(x, tile, per_sm, warps))))
    for tile, warps in itertools.product((8192, 16384), (4, 8)):
        used = " (used)" if (tile, warps) == (amax_triton.TILE, amax_triton.NUM_WARPS) else ""
        rows.append((f"amax two-stage tile={tile} warps={warps}{used}",
                     graph_ms(lambda: amax_triton.absolute_max(x, tile=tile, num_warps=warps))))
    for four_over_six, blocks, warps in itertools.product((False, True), (32, 64, 128, 256), (2, 4, 8)):
        rows.append((f"quantize 4/6={four_over_six:d} blocks={blocks} warps={warps}", graph_ms(
            lambda: nvfp4_triton.fake_quantize(x, amax, four_over_six, blocks=blocks, num_warps=warps))))
    print(f"{torch.cuda.get_device_name()}: GPU time per call, 8192x8192 bf16")
    for name, ms in sorted(rows, key=lambda r: r[1]):
        print(f"{ms:.4f} ms  {name}")
    small = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    print(f"host time per call on a 64x64 tensor: fake_quantize amax computed "
          f"{host_us(lambda: nvfp4.fake_quantize(small, check_finite=False)):.1f} us, amax given "
          f"{host_us(lambda: nvfp4.fake_quantize(small, 1.0, check_finite=False)):.1f} us, "
          f"kernel launch only {host_us(lambda: nvfp4_triton.fake_quantize(small, amax, False)):.1f} us")


if __name__ == "__main__":
    main()
