"""Quantize a weight matrix to NVFP4 and to NVFP4 with Four Over Six and compare their error.

    .venv/bin/python examples/quantize_tensor.py
"""

import torch

from megatron_qad.numerics import nvfp4


def relative_mse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((approx.float() - exact.float()) ** 2).sum() / (exact.float() ** 2).sum())


def main():
    torch.manual_seed(0)
    weight = (torch.randn(1024, 4096) * 0.02).bfloat16()
    packed = nvfp4.quantize(weight)
    print(f"weight {tuple(weight.shape)} {weight.dtype}: {weight.numel() * 2 / 2**20:.1f} MiB in BF16")
    print(f"NVFP4: data {tuple(packed.data.shape)} uint8 + scales {tuple(packed.scale.shape)} e4m3 "
          f"= {(packed.data.numel() + packed.scale.numel()) / 2**20:.2f} MiB, tensor amax {float(packed.global_amax):.4f}")
    print(f"relative MSE, NVFP4:            {relative_mse(packed.dequantize(), weight):.5f}")
    print(f"relative MSE, NVFP4 Four/Six:   {relative_mse(nvfp4.fake_quantize(weight, four_over_six=True), weight):.5f}")


if __name__ == "__main__":
    main()
