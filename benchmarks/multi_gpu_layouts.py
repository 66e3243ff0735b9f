"""QAD of one model at several GPU layouts: loss curves against the 1-GPU run, tokens/s and memory.

    python benchmarks/multi_gpu_layouts.py dense  [--out runs/layouts] [--markdown FILE]
    python benchmarks/multi_gpu_layouts.py hybrid [--out runs/layouts] [--markdown FILE]

Models (small, so a whole comparison runs in minutes on 2 GPUs):
  dense   Qwen2-shaped (``configs/qwen2_1p5b_shape.yaml``'s layer shapes, vocab and tied embeddings,
          4 layers, 1024 tokens)
  hybrid  Nemotron-3-Nano-shaped (``configs/tiny_hybrid_cpu.yaml``: Mamba2, GQA attention, MoE with a
          shared expert, pattern MEME*M*E; hidden 256, 512 tokens), in BF16 on the GPU, with the
          hybrid policy (attention and the Mamba layers feeding it stay BF16)

The first (1-GPU) run trains the teacher from scratch on the shipped text corpus and
saves it; every layout then runs ``megatron-qad train`` from that teacher at the same global batch
(the data of a step does not depend on the layout), logging every iteration. Layouts: 1 GPU, TP=2
(sequence parallel), PP=2, and DP=2 (dense; megatron.core's distributed optimizer, checkpoint saved)
or EP=2 (hybrid). The dense model also checks the distributed optimizer's checkpoint: a DP=2 run
stopped after half the steps (``training.exit_interval``) and resumed must repeat the uninterrupted
DP=2 run's losses. Rank 0 of every run prints its lines; this script prints (and with --markdown
writes) one table: the first steps' loss (KL), the largest relative difference to the 1-GPU curve,
median tokens/s, peak GPU memory and the teacher's weight memory per GPU.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

STEPS, SHOWN = 10, 5
COMMON = [f"training.train_iters={STEPS}", "training.log_interval=1", "training.eval_iters=2",
          "training.lr_warmup_iters=0", "model.params_dtype=bfloat16", "data.sources=[{type: corpus}]",
          "teacher.pretrain_iters=150", "teacher.pretrain_lr=1.0e-3", "distill.calibration_iters=2"]
MODELS = {
    "dense": ("configs/qwen2_1p5b_shape.yaml",
              ["model.num_layers=4", "model.seq_length=1024", "training.global_batch_size=16",
               "training.micro_batch_size=4", "training.lr=1.0e-5"]),
    "hybrid": ("configs/tiny_hybrid_cpu.yaml",
               ["model.hidden_size=256", "model.ffn_hidden_size=512", "model.moe_ffn_hidden_size=256",
                "model.moe_shared_expert_intermediate_size=512", "model.seq_length=512",
                "training.global_batch_size=16", "training.micro_batch_size=4", "training.lr=1.0e-4"]),
}
LAYOUTS = {
    "dense": [("1 GPU", 1, []),
              ("TP=2", 2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
              ("PP=2", 2, ["parallel.pipeline_model_parallel_size=2"]),
              ("DP=2 (distributed optimizer)", 2, [])],
    "hybrid": [("1 GPU", 1, []),
               ("TP=2", 2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
               ("PP=2", 2, ["parallel.pipeline_model_parallel_size=2"]),
               ("EP=2", 2, ["parallel.expert_model_parallel_size=2", "model.moe_token_dispatcher_type=alltoall"])],
}
ITERATION = re.compile(r"^iteration\s+(\d+)/\d+ \| (.*)$")


def train(recipe: str, gpus: int, overrides: list[str], log: Path) -> tuple[dict[int, dict], dict]:
    """Run ``megatron-qad train`` under torchrun; (iteration -> logged values, final summary)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29533", "-m", "megatron_qad.cli",
               "train", recipe, *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    steps, summary = {}, {}
    for line in result.stdout.splitlines():
        if match := ITERATION.match(line):
            values = dict(part.rsplit(" ", 1) for part in match.group(2).split(" | "))
            steps[int(match.group(1))] = {key: float(value) for key, value in values.items()}
        elif line.startswith("summary "):
            summary = json.loads(line.removeprefix("summary "))
    return steps, summary


def row(name: str, steps: dict[int, dict], summary: dict, reference: dict[int, dict]) -> str:
    losses = [steps[i]["loss"] for i in sorted(steps)]
    deviation = max(abs(steps[i]["loss"] / reference[i]["loss"] - 1) for i in steps)
    speed = statistics.median(steps[i]["tokens/s"] for i in sorted(steps)[1:])
    shown = " ".join(f"{loss:.4e}" for loss in losses[:SHOWN])
    return (f"| {name} | {shown} | {deviation:.2%} | {speed:,.0f} | {summary.get('peak GiB', float('nan')):.2f} | "
            f"{summary.get('teacher GiB', float('nan')):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--out", default="runs/layouts", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--max-gpus", type=int, help="only the layouts of at most this many GPUs "
                                                     "(default: the GPUs visible here)")
    args = parser.parse_args()
    max_gpus = args.max_gpus or torch.cuda.device_count()
    recipe, model_overrides = MODELS[args.model]
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    base = [*COMMON, *model_overrides, f"teacher.checkpoint={out / 'teacher'}"]
    lines = [f"| layout | loss (KL), steps 1-{SHOWN} | max rel. diff. to 1 GPU, steps 1-{STEPS} | tokens/s | "
             f"peak GiB | teacher GiB |", "|---|---|---:|---:|---:|---:|"]
    reference = None
    for name, gpus, layout in LAYOUTS[args.model]:
        if gpus > max_gpus:
            print(f"skipped {name}: needs {gpus} GPUs, {max_gpus} here", flush=True)
            continue
        tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        steps, summary = train(recipe, gpus, [*base, *layout, f"checkpoint.save={out / tag}",
                                              "checkpoint.resume=false"], out / f"{tag}.log")
        reference = reference or steps
        lines.append(row(name, steps, summary, reference))
        print(lines[-1], flush=True)
        if name.startswith("DP=2"):
            resumed = out / "dp_2_resumed"
            common = [*base, *layout, f"checkpoint.save={resumed}"]
            train(recipe, gpus, [*common, "checkpoint.resume=false", f"training.exit_interval={STEPS // 2}"],
                  out / "dp_2_first_half.log")
            second, second_summary = train(recipe, gpus, [*common, "checkpoint.resume=true"],
                                           out / "dp_2_second_half.log")
            if sorted(second) != list(range(STEPS // 2 + 1, STEPS + 1)):
                raise SystemExit(f"the resumed run logged iterations {sorted(second)}")
            lines.append(row(f"{name}, stopped at {STEPS // 2} and resumed", second, second_summary, reference))
            repeat = max(abs(second[i]["loss"] / steps[i]["loss"] - 1) for i in second)
            lines.append(f"| (resumed vs uninterrupted DP=2, steps {STEPS // 2 + 1}-{STEPS}) | max rel. diff. "
                         f"{repeat:.2e} | | | | |")
            print(lines[-2], lines[-1], sep="\n", flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(f"`python {' '.join(sys.argv)}`\n\n{text}")


if __name__ == "__main__":
    main()
