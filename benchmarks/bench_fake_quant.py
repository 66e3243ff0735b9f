"""NVFP4 fake-quant speed on a CUDA GPU: our Triton kernel vs our torch path vs NVIDIA ModelOpt.

Prints one Markdown table per run (device, date, versions) for
  * fake quant of an 8192 x 8192 bf16 tensor (tensor amax computed, and given), plain and 4/6;
  * a 4096 -> 4096 linear on 8192 tokens, forward + backward, weight and input fake-quantized,
    against the same linear in plain BF16 and ModelOpt's NVFP4_DEFAULT_CFG linear.
The memory floor is bytes moved / measured copy bandwidth: 6 bytes per element with the amax
computed (two reads and one write of bf16), 4 with it given.

    python benchmarks/bench_fake_quant.py            # needs a GPU; ModelOpt optional
"""

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from megatron_qad.numerics import nvfp4


def copy_bandwidth_bytes_per_ms() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms


def time_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=400, return_mode="median")


def load_modelopt():
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        from modelopt.torch.kernels.quantization.gemm import fp4_fake_quant_block
    except Exception as error:  # the peer is optional: report why it is missing
        print(f"ModelOpt unavailable: {error!r}")
        return None
    return modelopt.__version__, mtq, fp4_fake_quant_block


def fake_quant_rows(x, modelopt, floor_ms):
    amax = x.abs().amax().float()
    rows = [
        ("ours, Triton, amax computed", lambda: nvfp4.fake_quantize(x, check_finite=False), floor_ms[6]),
        ("ours, Triton, amax computed + finite check", lambda: nvfp4.fake_quantize(x), floor_ms[6]),
        ("ours, Triton, amax given", lambda: nvfp4.fake_quantize(x, amax, check_finite=False), floor_ms[4]),
        ("ours, Triton, 4/6, amax computed",
         lambda: nvfp4.fake_quantize(x, four_over_six=True, check_finite=False), floor_ms[6]),
        ("ours, torch reference, amax computed",
         lambda: nvfp4.fake_quantize(x, backend="torch", check_finite=False), floor_ms[6]),
    ]
    if modelopt is not None:
        fp4_fake_quant_block = modelopt[2]
        rows.append(("ModelOpt, amax computed (x.abs().amax() + kernel)",
                     lambda: fp4_fake_quant_block(x, x.abs().amax()), floor_ms[6]))
        rows.append(("ModelOpt, amax given", lambda: fp4_fake_quant_block(x, amax), floor_ms[4]))
    return [(name, time_ms(fn), floor) for name, fn, floor in rows]


def linear_rows(tokens, width, modelopt):
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(width, width, device="cuda") * width ** -0.5).bfloat16().requires_grad_()
    input_amax = x.detach().abs().amax().float()

    def step(forward):
        def run():
            forward().backward(grad)
        return run

    def ours(static_input_amax=None, four_over_six=False):
        def forward():
            xq = nvfp4.fake_quantize(x, static_input_amax, four_over_six, check_finite=False)
            wq = nvfp4.fake_quantize(weight, None, four_over_six, check_finite=False)
            return F.linear(xq, wq)
        return forward

    def ours_cached_weight():
        # Weights change only at the optimizer step: their fake quant can be made once per step and
        # reused by every micro-batch; this row is that steady state (input amax static).
        cached = nvfp4.fake_quantize(weight.detach(), check_finite=False).requires_grad_()
        return lambda: F.linear(nvfp4.fake_quantize(x, input_amax, check_finite=False), cached)

    rows = [("BF16 linear", step(lambda: F.linear(x, weight))),
            ("ours: input + weight NVFP4, amax computed", step(ours())),
            ("ours: input amax static (calibrated), weight computed", step(ours(input_amax))),
            ("ours: input amax static, weight fake quant cached per optimizer step",
             step(ours_cached_weight())),
            ("ours: 4/6, amax computed", step(ours(four_over_six=True)))]
    if modelopt is not None:
        mtq = modelopt[1]
        layer = torch.nn.Linear(width, width, bias=False, device="cuda", dtype=torch.bfloat16)
        layer.weight.data.copy_(weight.detach())
        mtq.quantize(layer, mtq.NVFP4_DEFAULT_CFG, forward_loop=lambda m: m(x.detach()))
        rows.append(("ModelOpt NVFP4_DEFAULT_CFG linear", step(lambda: layer(x))))
    return [(name, time_ms(fn)) for name, fn in rows]


def agreement_with_modelopt(x, modelopt) -> str:
    if modelopt is None:
        return "n/a"
    ours = nvfp4.fake_quantize(x, check_finite=False)
    theirs = modelopt[2](x, x.abs().amax())
    return f"{(ours != theirs).float().mean().item() * 100:.4f}% of elements differ"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="fake-quant tensor is size x size")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fake_quant.py needs a CUDA GPU")
    torch.manual_seed(0)
    modelopt = load_modelopt()

    bandwidth = copy_bandwidth_bytes_per_ms()
    x = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    floor_ms = {b: b * x.numel() / bandwidth for b in (4, 6)}

    print(f"\n### NVFP4 fake quant, {torch.cuda.get_device_name()}, "
          f"{datetime.date.today().isoformat()}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"ModelOpt {modelopt[0] if modelopt else 'absent'}, Python {platform.python_version()}; "
          f"copy bandwidth {bandwidth / 1e9:.2f} TB/s (read + write)\n")
    print(f"| {args.size}x{args.size} bf16 fake quant | ms | floor ms | % of floor |")
    print("|---|---:|---:|---:|")
    results = fake_quant_rows(x, modelopt, floor_ms)
    for name, ms, floor in results:
        print(f"| {name} | {ms:.4f} | {floor:.4f} | {floor / ms * 100:.0f}% |")
    plain = dict((n, ms) for n, ms, _ in results)
    ratio = plain["ours, Triton, 4/6, amax computed"] / plain["ours, Triton, amax computed"]
    print(f"\n4/6 vs plain (Triton): {ratio:.2f}x; ours vs ModelOpt bits: {agreement_with_modelopt(x, modelopt)}\n")

    print(f"| linear {args.width}->{args.width}, {args.tokens} tokens, fwd+bwd | ms | vs BF16 |")
    print("|---|---:|---:|")
    linear = linear_rows(args.tokens, args.width, modelopt)
    base = linear[0][1]
    for name, ms in linear:
        print(f"| {name} | {ms:.3f} | {ms / base:.3f}x |")


if __name__ == "__main__":
    main()
