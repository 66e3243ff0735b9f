"""QAD of one model at several GPU layouts: loss curves against the 1-GPU run, tokens/s and memory.

    python benchmarks/multi_gpu_layouts.py dense  [--out runs/layouts] [--markdown FILE] [--repeats 5]
    python benchmarks/multi_gpu_layouts.py hybrid [--out runs/layouts] [--markdown FILE] [--repeats 5]

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
tokens/s, peak GPU memory and the teacher's weight memory per GPU. The 1-GPU row's difference is
that of its own repeats against its first run: the noise floor the other rows' differences are read
against (0 where the GPU repeats a run bit for bit; see docs/LAYOUTS.md, "Repeatability").

Speed: every layout runs ``--repeats`` times, the layouts in rotation (A B C A B C ...) so that drift
between runs hits all of them; a run's speed is the median tokens/s of its iterations after the
first, and the table gives the median and the min-max range over the runs, and the ratio to the
1-GPU speed only where the two ranges separate. Losses and memory are those of the first round
(the largest difference and peak over all rounds).
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from repeats import MIN_REPEATS, Spread, ratio_claim

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
ELAPSED = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
"""Megatron's iteration line: the iteration and its wall time."""


def train(recipe: str, gpus: int, overrides: list[str], log: Path) -> tuple[dict[int, dict], dict]:
    """Run ``megatron-qad train`` under torchrun; (iteration -> logged values, final summary)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29533", "-m", "megatron_qad.cli",
               "train", recipe, *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    short = next(json.loads(line.removeprefix("summary ")) for line in reversed(result.stdout.splitlines())
                 if line.startswith("summary {"))
    summary = json.loads(Path(short["record"]).read_text())  # the run's whole record (checkpoint.save/summary.json)
    steps = {line["iteration"]: dict(line) for line in summary["train"]}
    tokens_per_step = _value(overrides, "training.global_batch_size") * _value(overrides, "model.seq_length")
    for match in ELAPSED.finditer(result.stdout):
        if int(match.group(1)) in steps:
            steps[int(match.group(1))]["tokens/s"] = tokens_per_step / (float(match.group(2)) / 1000)
    return steps, summary


def _value(overrides: list[str], key: str) -> int:
    """The last ``key=value`` of ``overrides`` (an int)."""
    return int([item.split("=", 1)[1] for item in overrides if item.startswith(key + "=")][-1])


def speed(steps: dict[int, dict]) -> float:
    """Median tokens/s of a run's iterations after the first (which includes warm-up)."""
    return statistics.median(steps[i]["tokens/s"] for i in sorted(steps)[1:])


def row(name: str, runs: list[tuple[dict[int, dict], dict]], reference: dict[int, dict],
        reference_speed: Spread | None) -> str:
    """A table row of the runs of one layout (the first run's losses shown)."""
    steps, summary = runs[0]
    losses = [steps[i]["loss"] for i in sorted(steps)]
    deviation = max(abs(run[i]["loss"] / reference[i]["loss"] - 1) for run, _ in runs for i in run)
    speeds = Spread.of([speed(run) for run, _ in runs])
    claim = "" if reference_speed is None else ratio_claim(speeds, reference_speed)
    shown = " ".join(f"{loss:.4e}" for loss in losses[:SHOWN])
    peak = max(s.get("peak GiB", float("nan")) for _, s in runs)
    return (f"| {name} | {shown} | {deviation:.2%} | {speeds.format(0)} | {claim} | {peak:.2f} | "
            f"{summary.get('teacher GiB', float('nan')):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--out", default="runs/layouts", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--max-gpus", type=int, help="only the layouts of at most this many GPUs "
                                                     "(default: the GPUs visible here)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="runs of every layout, in rotation")
    args = parser.parse_args()
    max_gpus = args.max_gpus or torch.cuda.device_count()
    recipe, model_overrides = MODELS[args.model]
    out = args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    base = [*COMMON, *model_overrides, f"teacher.checkpoint={out / 'teacher'}"]
    layouts = []
    for name, gpus, layout in LAYOUTS[args.model]:
        if gpus > max_gpus:
            print(f"skipped {name}: needs {gpus} GPUs, {max_gpus} here", flush=True)
        else:
            layouts.append((name, gpus, layout))
    runs = {name: [] for name, _, _ in layouts}
    resumed_rows = []
    for repeat in range(args.repeats):
        for name, gpus, layout in layouts:
            tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + (f"_{repeat + 1}" if repeat else "")
            runs[name].append(train(recipe, gpus, [*base, *layout, f"checkpoint.save={out / tag}",
                                                   "checkpoint.resume=false"], out / f"{tag}.log"))
            print(f"round {repeat + 1}/{args.repeats}, {name}: {speed(runs[name][-1][0]):,.0f} tokens/s", flush=True)
            if repeat == 0 and name.startswith("DP=2"):
                resumed_rows = resume_check(recipe, gpus, base, layout, out, name, runs[name][0][0])
    reference = runs[layouts[0][0]][0][0]
    reference_speed = Spread.of([speed(steps) for steps, _ in runs[layouts[0][0]]])
    lines = [f"| layout | loss (KL), steps 1-{SHOWN} | max rel. diff. to 1 GPU, steps 1-{STEPS} | "
             f"tokens/s, median (min-max) of {args.repeats} | vs {layouts[0][0]} | peak GiB | teacher GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, _, _ in layouts:
        lines.append(row(name, runs[name], reference, None if name == layouts[0][0] else reference_speed))
        if name.startswith("DP=2"):
            lines += [line if isinstance(line, str) else row(*line, reference, None)
                      for line in resumed_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(f"`python {' '.join(sys.argv)}`\n\n{text}")


def resume_check(recipe: str, gpus: int, base: list[str], layout: list[str], out: Path, name: str,
                 uninterrupted: dict[int, dict]) -> list:
    """Run the layout stopped after half the steps and resumed; the table rows it gives (a row's
    arguments, then a line): its losses must repeat the uninterrupted run's."""
    resumed = out / "dp_2_resumed"
    common = [*base, *layout, f"checkpoint.save={resumed}"]
    train(recipe, gpus, [*common, "checkpoint.resume=false", f"training.exit_interval={STEPS // 2}"],
          out / "dp_2_first_half.log")
    # The DP=2 checkpoint at half-way, kept to resume on one GPU (another data-parallel size) below.
    single = out / "dp_2_resumed_on_1"
    shutil.rmtree(single, ignore_errors=True)
    shutil.copytree(resumed, single)
    second, second_summary = train(recipe, gpus, [*common, "checkpoint.resume=true"], out / "dp_2_second_half.log")
    if sorted(second) != list(range(STEPS // 2 + 1, STEPS + 1)):
        raise SystemExit(f"the resumed run logged iterations {sorted(second)}")
    repeat = max(abs(second[i]["loss"] / uninterrupted[i]["loss"] - 1) for i in second)
    rows = [(f"{name}, stopped at {STEPS // 2} and resumed", [(second, second_summary)]),
            f"| (resumed vs uninterrupted DP=2, steps {STEPS // 2 + 1}-{STEPS}) | max rel. diff. {repeat:.2e} | | | | | |"]
    try:
        third, _ = train(recipe, 1, [*base, f"checkpoint.save={single}", "checkpoint.resume=true",
                                     "training.use_distributed_optimizer=true"], out / "dp_2_resumed_on_1.log")
        repeat_1 = max(abs(third[i]["loss"] / uninterrupted[i]["loss"] - 1) for i in third)
        rows.append(f"| (DP=2 checkpoint resumed on 1 GPU vs uninterrupted DP=2) | max rel. diff. {repeat_1:.2e} | | | | | |")
    except SystemExit as failure:
        lines = str(failure).splitlines()
        reason = ([line for line in lines if "Error" in line or "error:" in line] or lines)[-1]
        rows.append(f"| (DP=2 checkpoint resumed on 1 GPU) | failed: {reason.strip()[:200]} | | | | | |")
    return rows


if __name__ == "__main__":
    main()
