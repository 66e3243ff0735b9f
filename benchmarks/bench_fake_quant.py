"""NVFP4 fake-quant speed on a CUDA GPU: our Triton kernel vs our torch path vs NVIDIA ModelOpt.

Prints Markdown tables (device, date, versions) for
  * fake quant of an 8192 x 8192 bf16 tensor (tensor amax computed, and given), plain and 4/6;
  * a 4096 -> 4096 linear on 8192 tokens, forward + backward, weight and input fake-quantized,
    against the same linear in plain BF16 and ModelOpt's NVFP4_DEFAULT_CFG linear;
  * with ``--grouped``: the expert layers of Nemotron 3 Nano (128 experts, 2688 -> 1856 and
    1856 -> 2688, bf16, Nano's top-6 routing of ``--routed-tokens`` tokens, uneven, some experts
    routed none), forward + backward, the per-expert loop (one amax, one fake quant and one GEMM
    per expert and role) against the grouped path (all experts' tokens in one fake-quant launch, all
    their weights in another, then per-expert GEMMs or one grouped GEMM).
The memory floor is bytes moved / measured copy bandwidth: 6 bytes per element with the amax
computed (two reads and one write of bf16), 4 with it given.

Every row is timed ``--repeats`` times, the rows interleaved (A B C A B C ...) so that drift hits
all of them; tables give the median and the min-max range of the repeats (each repeat itself the
median of ``triton.testing.do_bench``), and a ratio only where the two ranges separate.

    python benchmarks/bench_fake_quant.py [--grouped] [--repeats 5]   # needs a GPU; ModelOpt optional
"""

import argparse
import datetime
import platform

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from megatron_qad.numerics import nvfp4, nvfp4_grouped
from repeats import MIN_REPEATS, NO_CLAIM, Spread, interleave, markdown_table, ratio_claim

NANO_EXPERTS, NANO_HIDDEN, NANO_EXPERT_WIDTH, NANO_TOPK = 128, 2688, 1856, 6


def copy_bandwidth_bytes_per_ms() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms


def timed(rows: dict, repeats: int, grad_to_none=None) -> dict[str, Spread]:
    """name -> Spread (ms) of each row's callable, the rows interleaved over ``repeats`` rounds."""
    def measure(fn):
        return lambda: do_bench(fn, warmup=10, rep=100, grad_to_none=grad_to_none, return_mode="median")

    samples = interleave({name: measure(fn) for name, fn in rows.items()}, repeats)
    return {name: Spread.of(values) for name, values in samples.items()}


def load_modelopt():
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        from modelopt.torch.kernels.quantization.gemm import fp4_fake_quant_block
    except Exception as error:  # the peer is optional: report why it is missing
        print(f"ModelOpt unavailable: {error!r}")
        return None
    return modelopt.__version__, mtq, fp4_fake_quant_block


def fake_quant_rows(x, modelopt):
    """name -> (callable, bytes per element of its memory floor)."""
    amax = x.abs().amax().float()
    rows = {
        "ours, Triton, amax computed": (lambda: nvfp4.fake_quantize(x, check_finite=False), 6),
        "ours, Triton, amax computed + finite check": (lambda: nvfp4.fake_quantize(x), 6),
        "ours, Triton, amax given": (lambda: nvfp4.fake_quantize(x, amax, check_finite=False), 4),
        "ours, Triton, 4/6, amax computed": (lambda: nvfp4.fake_quantize(x, four_over_six=True, check_finite=False), 6),
        "ours, torch reference, amax computed": (lambda: nvfp4.fake_quantize(x, backend="torch", check_finite=False), 6),
    }
    if modelopt is not None:
        fp4_fake_quant_block = modelopt[2]
        rows["ModelOpt, amax computed (x.abs().amax() + kernel)"] = (lambda: fp4_fake_quant_block(x, x.abs().amax()), 6)
        rows["ModelOpt, amax given"] = (lambda: fp4_fake_quant_block(x, amax), 4)
    return rows


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

    rows = {"BF16 linear": step(lambda: F.linear(x, weight)),
            "ours: input + weight NVFP4, amax computed": step(ours()),
            "ours: input amax static (calibrated), weight computed": step(ours(input_amax)),
            "ours: input amax static, weight fake quant cached per optimizer step": step(ours_cached_weight()),
            "ours: 4/6, amax computed": step(ours(four_over_six=True))}
    if modelopt is not None:
        mtq = modelopt[1]
        layer = torch.nn.Linear(width, width, bias=False, device="cuda", dtype=torch.bfloat16)
        layer.weight.data.copy_(weight.detach())
        mtq.quantize(layer, mtq.NVFP4_DEFAULT_CFG, forward_loop=lambda m: m(x.detach()))
        rows["ModelOpt NVFP4_DEFAULT_CFG linear"] = step(lambda: layer(x))
    return rows, [x, weight]


def nano_token_counts(routed_tokens: int, generator: torch.Generator) -> list[int]:
    """Tokens per expert of ``routed_tokens`` routed assignments (top-6 of routed_tokens / 6 tokens):
    expert popularity uniform in [0.5, 1.5) (a balanced router's spread), two experts routed none."""
    popularity = 0.5 + torch.rand(NANO_EXPERTS, generator=generator)
    popularity[:2] = 0
    counts = torch.multinomial(popularity / popularity.sum(), routed_tokens, replacement=True, generator=generator)
    return torch.bincount(counts, minlength=NANO_EXPERTS).tolist()


def grouped_rows(m_splits: list[int], n_in: int, n_out: int):
    """Rows of one Nano expert layer (n_in -> n_out per expert), forward + backward."""
    from megatron_qad.grouped_experts import grouped_expert_gemm  # megatron.core, only for this table

    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(sum(m_splits), n_in, device="cuda", generator=generator).bfloat16().requires_grad_()
    grad = torch.randn(sum(m_splits), n_out, device="cuda", generator=generator).bfloat16()
    weights = [(torch.randn(n_out, n_in, device="cuda", generator=generator) * n_in ** -0.5).bfloat16().requires_grad_()
               for _ in range(NANO_EXPERTS)]

    def per_expert(quantize: bool):
        def run():
            outputs = []
            for tokens, weight in zip(torch.split(x, m_splits), weights):
                if quantize:
                    tokens = nvfp4.fake_quantize(tokens, None, check_finite=False)
                    weight = nvfp4.fake_quantize(weight, None, check_finite=False)
                outputs.append(F.linear(tokens, weight))
            torch.cat(outputs).backward(grad)
        return run

    def grouped_quant(gemm: str):
        def run():
            xq = nvfp4_grouped.fake_quantize_rows(x, m_splits)
            if gemm == "grouped":
                out = grouped_expert_gemm(xq, nvfp4_grouped.fake_quantize_tensors(weights, stacked=True), m_splits)
            else:
                wq = nvfp4_grouped.fake_quantize_tensors(weights)
                out = torch.cat([F.linear(t, w) for t, w in zip(torch.split(xq, m_splits), wq)])
            out.backward(grad)
        return run

    def bf16_grouped():
        grouped_expert_gemm(x, torch.stack(weights), m_splits).backward(grad)

    def quant_only(grouped: bool):
        if grouped:
            return lambda: (nvfp4_grouped.fake_quantize_rows(x.detach(), m_splits),
                            nvfp4_grouped.fake_quantize_tensors([w.detach() for w in weights]))
        return lambda: ([nvfp4.fake_quantize(t, None, check_finite=False) for t in torch.split(x.detach(), m_splits)],
                        [nvfp4.fake_quantize(w.detach(), None, check_finite=False) for w in weights])

    rows = {"BF16, per-expert GEMMs": per_expert(False),
            "BF16, grouped GEMM (weights stacked each call)": bf16_grouped,
            "NVFP4 per expert (amax + fake quant + GEMM per expert)": per_expert(True),
            "NVFP4 grouped fake quant, per-expert GEMMs": grouped_quant("per_expert"),
            "NVFP4 grouped fake quant, grouped GEMM": grouped_quant("grouped"),
            "fake quant only, per expert (2 x 128 tensors)": quant_only(False),
            "fake quant only, grouped (2 launches + 2 amax)": quant_only(True)}
    return rows, [x, *weights]


def grouped_table(args) -> str:
    generator = torch.Generator().manual_seed(0)
    m_splits = nano_token_counts(args.routed_tokens, generator)
    lines = [f"Nano expert layers: {NANO_EXPERTS} experts, {sum(m_splits)} routed tokens "
             f"({min(m_splits)}-{max(m_splits)} per expert, {m_splits.count(0)} experts routed none), "
             f"forward + backward, dynamic amax\n"]
    for n_in, n_out in ((NANO_HIDDEN, NANO_EXPERT_WIDTH), (NANO_EXPERT_WIDTH, NANO_HIDDEN)):
        rows, tensors = grouped_rows(m_splits, n_in, n_out)
        spreads = timed(rows, args.repeats, grad_to_none=tensors)
        lines.append(f"#### expert {'fc1' if n_in == NANO_HIDDEN else 'fc2'}, {n_in} -> {n_out}\n")
        lines.append(markdown_table(spreads, "BF16, per-expert GEMMs"))
        quant = {name: spread for name, spread in spreads.items() if name.startswith("fake quant only")}
        per, grouped = quant.values()
        lines.append(f"\nfake quant alone, per expert / grouped: {ratio_claim(per, grouped)}; NVFP4 layer, "
                     f"per expert / grouped fake quant + per-expert GEMMs: "
                     f"{ratio_claim(spreads['NVFP4 per expert (amax + fake quant + GEMM per expert)'], spreads['NVFP4 grouped fake quant, per-expert GEMMs'])}; "
                     f"per-expert GEMMs / grouped GEMM (both NVFP4 grouped fake quant): "
                     f"{ratio_claim(spreads['NVFP4 grouped fake quant, per-expert GEMMs'], spreads['NVFP4 grouped fake quant, grouped GEMM'])}\n")
        del rows, tensors
        torch.cuda.empty_cache()
    return "\n".join(lines)


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
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="interleaved repeats of every row")
    parser.add_argument("--grouped", action="store_true", help="also time Nano's expert layers, per expert vs grouped")
    parser.add_argument("--grouped-only", action="store_true", help="only the expert-layer tables")
    parser.add_argument("--routed-tokens", type=int, default=4096 * NANO_TOPK,
                        help="token-expert assignments of the expert layer (tokens x top-6)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fake_quant.py needs a CUDA GPU")
    torch.manual_seed(0)
    modelopt = load_modelopt()

    bandwidth = copy_bandwidth_bytes_per_ms()
    print(f"\n### NVFP4 fake quant, {torch.cuda.get_device_name()}, "
          f"{datetime.date.today().isoformat()}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"ModelOpt {modelopt[0] if modelopt else 'absent'}, Python {platform.python_version()}; "
          f"copy bandwidth {bandwidth / 1e9:.2f} TB/s (read + write); each row median (min-max) of "
          f"{args.repeats} interleaved repeats\n")
    if not args.grouped_only:
        x = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
        rows = fake_quant_rows(x, modelopt)
        spreads = timed({name: fn for name, (fn, _) in rows.items()}, args.repeats)
        print(f"| {args.size}x{args.size} bf16 fake quant | ms, median (min-max) | floor ms | % of floor (median) |")
        print("|---|---:|---:|---:|")
        for name, (_, floor_bytes) in rows.items():
            floor = floor_bytes * x.numel() / bandwidth
            print(f"| {name} | {spreads[name].format(4)} | {floor:.4f} | {floor / spreads[name].median * 100:.0f}% |")
        ratio = ratio_claim(spreads["ours, Triton, 4/6, amax computed"], spreads["ours, Triton, amax computed"])
        print(f"\n4/6 vs plain (Triton): {ratio}; ours vs ModelOpt bits: {agreement_with_modelopt(x, modelopt)}\n")
        del x

        linear, tensors = linear_rows(args.tokens, args.width, modelopt)
        print(f"linear {args.width}->{args.width}, {args.tokens} tokens, fwd+bwd\n")
        print(markdown_table(timed(linear, args.repeats, grad_to_none=tensors), "BF16 linear"))
        print(f"\n(\"{NO_CLAIM}\": the two rows' ranges overlap over the repeats)\n")
    if args.grouped or args.grouped_only:
        print(grouped_table(args))


if __name__ == "__main__":
    main()
