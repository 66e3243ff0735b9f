"""What a QAD optimizer step costs next to a BF16 training step of the same model, in one run.

    python benchmarks/bench_qad_step.py [--recipe configs/qwen2_1p5b_shape.yaml] [--steps 10]
                                        [--warmup 3] [--repeats 5] [--variants bf16,qad,...]
                                        [--markdown FILE] [--profile DIR] [key.path=value ...]
    torchrun --nproc-per-node 2 benchmarks/bench_qad_step.py ...   # any layout of the recipe

Every variant builds its models from the recipe (same seed, same layout), wraps the trained one in
megatron.core's DistributedDataParallel with its Adam (mixed precision for bf16), and times
``--steps`` optimizer steps of ``training.global_batch_size`` sequences after ``--warmup`` ones
(each between two CUDA events, the host not waiting between steps; their median is one
measurement). The whole set of variants
runs ``--repeats`` times in rotation (A B C A B C ...: each round builds, times and frees every
variant), so drift between runs hits all of them alike; the table gives the median and the min-max
range over the rounds, and a ratio to the BF16 step only where the two ranges separate. Data:
uniform random tokens, the same for every variant. Variants (``--variants`` picks some by key):

  bf16: BF16 training   the unquantized student, cross entropy on the labels: the reference step
  qat: NVFP4 QAT        the quantized student (recipe's policy, calibrated input amax), cross entropy,
                        weights fake-quantized once per step: what quantization adds
  teacher: teacher forward  the teacher's forward pass over the step's micro-batches, no gradients
  qad_every: QAD, weights every  teacher forward + quantized student + KL(teacher || student), every weight
    micro-batch         fake-quantized at every micro-batch
  qad: QAD              the same with each weight fake-quantized once per optimizer step (the default,
                        ``quantization.reuse_quantized_weights``)
  modelopt: QAD, ModelOpt student  the same step with NVIDIA ModelOpt's NVFP4_DEFAULT_CFG fake quant
                        in place of ours (when modelopt is installed), calibrated on the same batch
  modelopt_mamba_moe: QAD, ModelOpt MAMBA_MOE_NVFP4_CONSERVATIVE_CFG student  the same with
                        ModelOpt's preset for Mamba-MoE hybrids (where this ModelOpt has it)

Rank 0 prints a Markdown table (ms per step, tokens/s, ratio to BF16, peak memory over the rounds)
and, from the medians, where the QAD step's time goes: quantization (QAT - BF16), the teacher's forward, and the KL with the second
model's bookkeeping (QAD - QAT - teacher forward), and each ModelOpt student's QAD step over ours
(a ratio only where the ranges separate). Under data parallelism the gradient all-reduce
is part of every trained variant. ``--profile DIR`` also runs one more step of each variant under
torch.profiler in the first round: the table gets where its GPU time goes by phase (teacher
forward, student forward, loss, optimizer step, backward and the rest, fake-quant kernels, GPU
idle; ``step_profile.py``), and ``DIR/<variant>.txt`` its GPU kernels, heaviest first (rank 0).
"""

import argparse
import contextlib
import gc
import os
import statistics
import time

import torch
from megatron.core import parallel_state

from megatron_qad import parallel, quantize
from megatron_qad.config import load_config
from megatron_qad.distill import DistillationLoss, TeacherStudentStage, chunk_iterators, distillation_step
from megatron_qad.models import DTYPES, build_model_chunks, causal_attention_mask
from megatron_step import build_optimizer, resolve_distributed_optimizer, wrap_ddp
from repeats import MIN_REPEATS, Spread, ratio_claim
from step_profile import OPTIMIZER_STEP, phase_table, phase_times


class Bench:
    """Models, data and timing of one recipe on this rank."""

    def __init__(self, config, context, steps: int, warmup: int, profile_dir: str | None = None):
        self.config, self.device, self.steps, self.warmup = config, context.device, steps, warmup
        self.profile_dir = profile_dir
        t = config.training
        self.dp_size = context.data_parallel_size
        self.micro_batches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        if self.micro_batches * t.micro_batch_size * self.dp_size != t.global_batch_size:
            raise SystemExit(f"training.global_batch_size ({t.global_batch_size}) must be a multiple of "
                             f"micro_batch_size x data-parallel size ({t.micro_batch_size * self.dp_size})")
        generator = torch.Generator().manual_seed(1000 + parallel_state.get_data_parallel_rank())
        shape = (t.micro_batch_size, config.model.seq_length)
        self.batches = [{"tokens": torch.randint(0, config.model.vocab_size, shape, generator=generator).to(self.device),
                         "labels": torch.randint(0, config.model.vocab_size, shape, generator=generator).to(self.device),
                         "loss_mask": torch.ones(shape, device=self.device)}
                        for _ in range(self.micro_batches)]
        self.tokens_per_step = t.global_batch_size * config.model.seq_length

    def chunks(self):
        return build_model_chunks(self.config.model, self.config.parallel, self.device)

    def calibrated_student(self, teacher_chunks):
        """The recipe's NVFP4 student of the teacher's weights, its static amaxes calibrated on the batches."""
        students = self.chunks()
        for student, teacher in zip(students, teacher_chunks):
            student.load_state_dict(teacher.state_dict())
        quantize.apply(students, self.config.quantization.to_policy())
        stages = [TeacherStudentStage(student, teacher) for student, teacher in zip(students, teacher_chunks)]
        with quantize.calibration(students):
            self.run_step(stages, DistillationLoss("kl"), forward_only=True)
        return students

    def run_step(self, chunks, loss: DistillationLoss, forward_only: bool = False, reuse: bool = False):
        hold = quantize.reuse_quantized_weights(chunks) if reuse else contextlib.nullcontext()
        with hold:
            return distillation_step(chunks, chunk_iterators(chunks, self.batches), self.micro_batches,
                                     self.config.training.micro_batch_size, self.config.model.seq_length, loss,
                                     forward_only=forward_only)

    def time_training(self, name: str, chunks, loss: DistillationLoss, reuse: bool) -> dict:
        """Median seconds of an optimizer step (zero grads, forward / backward of every micro-batch,
        gradient reduction, Adam) and peak memory of ``chunks`` trained on ``loss``."""
        use_dist_opt = resolve_distributed_optimizer(self.config.training, self.dp_size, self.device)
        ddp_chunks = wrap_ddp(chunks, use_dist_opt)
        optimizer, _ = build_optimizer(ddp_chunks, self.config.training, DTYPES[self.config.model.params_dtype],
                                       use_dist_opt)

        def step():
            for chunk in ddp_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            self.run_step(ddp_chunks, loss, reuse=reuse)
            with torch.profiler.record_function(OPTIMIZER_STEP):
                optimizer.step()

        try:
            return self.time(name, step)
        finally:
            release(ddp_chunks)
            release_optimizer(optimizer)

    def time(self, name: str, step) -> dict:
        """Median seconds and peak memory of ``step()``; profiled once more when asked (then
        ``"profile"``: the phase table of :mod:`step_profile`).

        Each timed step lies between two CUDA events on the current stream, and the host does not
        wait for the GPU between steps: a step's time is from the end of the previous one on the
        GPU to its own end (what a training loop's step costs; a host that falls behind shows as
        GPU idle time inside the step). Python's garbage collector is off from the warmup to the
        last timed step, collected once before (as Megatron-LM's ``--manual-gc`` runs training): a
        collection of the models' objects inside a step would stall its host by tens of ms."""
        torch.cuda.reset_peak_memory_stats()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.steps)]
        gc.collect()
        gc.disable()
        try:
            for _ in range(self.warmup):
                step()
            torch.cuda.synchronize()
            for start, end in events:
                start.record()
                step()
                end.record()
            torch.cuda.synchronize()
        finally:
            gc.enable()
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
        # Every rank takes the slowest rank's time of each step (one step ends when all ranks are done).
        times = torch.tensor(seconds, device=self.device)
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        timing = {"seconds": statistics.median(times.tolist()),
                  "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
                  # cudaMalloc failures the caching allocator answered by freeing its cache and
                  # retrying: each synchronises the device, so a step near the memory limit slows down.
                  "alloc retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries}
        if self.profile_dir:
            timing["profile"] = self.profile(name, step, timing["seconds"])
        return timing

    def profile(self, name: str, step, timed_seconds: float) -> str:
        """Profile one more ``step()``: its phase table (:func:`step_profile.phase_table`, returned;
        ``timed_seconds``: the unprofiled steps' median) and its operators by GPU time and by host
        time, written to ``profile_dir/<name>.txt`` (rank 0)."""
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profiler:
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        table = phase_table(phase_times(profiler.events()), wall_us, timed_seconds * 1e6)
        if torch.distributed.get_rank() == 0:
            os.makedirs(self.profile_dir, exist_ok=True)
            averages = profiler.key_averages()
            with open(os.path.join(self.profile_dir, name.replace(" ", "_").replace(",", "") + ".txt"), "w") as out:
                out.write(f"{table}\n\n")
                for key in ("self_cuda_time_total", "self_cpu_time_total"):
                    out.write(f"by {key}\n{averages.table(sort_by=key, row_limit=40, max_name_column_width=90)}\n")
        return table


def release(ddp_chunks) -> None:
    """Free the parameters and gradient buffers of megatron.core DDP-wrapped ``ddp_chunks``.

    megatron.core's DDP is never garbage collected: its gradient hooks live on autograd nodes,
    which Python's collector cannot traverse (DDP -> grad_accs -> node -> hook -> DDP), so a model
    trained under it keeps its weights, gradient buffers and (through ``param.main_param``) the
    mixed-precision optimizer's fp32 weights until the process ends. A benchmark that trains
    several models in turn empties them instead.
    """
    for chunk in ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            buffer.grad_data = buffer.param_data = None
            for bucket in buffer.buckets:
                bucket.grad_data = bucket.param_data = None
        # With the distributed optimizer (the default at DP > 1), each bucket group caches views of
        # its buckets' parameter and gradient shards for the reduce-scatter and all-gather: views
        # that would keep both whole buffers alive.
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            group.cached_param_buffer_shard_list = [None] * len(group.buckets)
            group.cached_grad_buffer_shard_list = [None] * len(group.buckets)
        for param in chunk.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            param.grad = None
            # Tensors megatron.core hangs on the parameter: main_grad (a view of the gradient
            # buffer) and the mixed-precision optimizer's fp32 copy, main_param.
            for name, value in list(vars(param).items()):
                if isinstance(value, torch.Tensor):
                    setattr(param, name, None)


OPTIMIZER_TENSOR_GROUPS = ("model_float16_groups", "model_fp32_groups", "shard_float16_groups", "shard_fp32_groups",
                           "shard_fp32_from_float16_groups", "float16_groups", "fp32_from_float16_groups",
                           "fp32_from_fp32_groups")
"""The lists (per param group) of tensors megatron.core's mixed-precision optimizers keep: the
distributed optimizer's (views of the model's parameters and their shards, its FP32 main shards)
and the non-distributed one's (the model's parameters, its FP32 main weights)."""


def release_optimizer(optimizer) -> None:
    """Free, in place, the tensors megatron.core's ``optimizer`` (its ``ChainedOptimizer``) keeps:
    the FP32 main weights (the distributed optimizer's shards of them) with their gradients, Adam's
    moments, and the views of the model's parameters in :data:`OPTIMIZER_TENSOR_GROUPS` (a view
    keeps its whole base buffer alive), as :func:`release` frees the model's: whoever still holds
    the optimizer then holds empty tensors. (At EP=2 / DP=2, with the distributed optimizer, on 2
    H200s at Nano widths, memory was not given back between rounds before this: the third round
    ran out with 134 GiB allocated per GPU, 2026-11-30.)"""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        tensors = [tensor for name in OPTIMIZER_TENSOR_GROUPS for group in getattr(inner, name, [])
                   for tensor in group]
        if adam is not None:  # None: a stub for a model part without trained parameters
            for group in adam.param_groups:
                for param in group["params"]:
                    tensors += [param, *(value for value in adam.state.get(param, {}).values()
                                         if isinstance(value, torch.Tensor))]
            adam.state.clear()
        for tensor in tensors:
            tensor.grad = None
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def modelopt_student(bench: Bench, teacher_chunks, config_name: str = "NVFP4_DEFAULT_CFG"):
    """The teacher's weights under ModelOpt's ``config_name`` fake quant, calibrated on the batches
    (None, with the reason printed, if ModelOpt is missing, lacks the config or cannot quantize this model)."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as error:
        print(f"ModelOpt unavailable: {error!r}")
        return None
    quant_config = getattr(mtq, config_name, None)
    if quant_config is None:
        print(f"ModelOpt has no {config_name}")
        return None
    students = bench.chunks()
    for student, teacher in zip(students, teacher_chunks):
        student.load_state_dict(teacher.state_dict())
    s = bench.config.model.seq_length
    positions = torch.arange(s, device=bench.device).expand(bench.config.training.micro_batch_size, -1)
    mask = causal_attention_mask(s, bench.device)

    def forward_loop(model):
        with torch.no_grad():
            for batch in bench.batches:
                model(batch["tokens"], positions, mask)

    try:
        if len(students) > 1 or parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("the ModelOpt row needs pipeline-parallel size 1 (its calibration "
                                      "loop here runs the whole model)")
        return [mtq.quantize(students[0], quant_config, forward_loop=forward_loop)]
    except Exception as error:  # the peer row is optional; report why it is missing
        print(f"ModelOpt could not quantize the model: {error!r}")
        return None


VARIANTS = {"bf16": "BF16 training", "teacher": "teacher forward", "qat": "NVFP4 QAT",
            "qad_every": "QAD, weights quantized every micro-batch", "qad": "QAD",
            "modelopt": "QAD, ModelOpt student",
            "modelopt_mamba_moe": "QAD, ModelOpt MAMBA_MOE_NVFP4_CONSERVATIVE_CFG student"}


def measure(bench: Bench, selected: set[str]) -> dict[str, dict]:
    """One round: the timing of every ``selected`` variant (keys of :data:`VARIANTS`); each variant's
    trained model and optimizer are freed before the next."""
    kl, ce = DistillationLoss("kl"), DistillationLoss("ce")
    rows = {}
    if "bf16" in selected:
        rows["BF16 training"] = bench.time_training("BF16 training", bench.chunks(), ce, reuse=False)
        free()
    teachers = bench.chunks()
    for teacher in teachers:
        teacher.requires_grad_(False)
    if "teacher" in selected:
        rows["teacher forward"] = bench.time("teacher forward", lambda: bench.run_step(teachers, ce, forward_only=True))
    if "qat" in selected:
        rows["NVFP4 QAT"] = bench.time_training("NVFP4 QAT", bench.calibrated_student(teachers), ce, reuse=True)
        free()

    def qad(name: str, students, reuse: bool) -> None:
        stages = [TeacherStudentStage(student, teacher) for student, teacher in zip(students, teachers)]
        rows[name] = bench.time_training(name, stages, kl, reuse=reuse)
        free()

    if "qad_every" in selected:
        qad(VARIANTS["qad_every"], bench.calibrated_student(teachers), reuse=False)
    if "qad" in selected:
        qad("QAD", bench.calibrated_student(teachers), reuse=True)
    for key, config_name in (("modelopt", "NVFP4_DEFAULT_CFG"),
                             ("modelopt_mamba_moe", "MAMBA_MOE_NVFP4_CONSERVATIVE_CFG")):
        if key in selected:
            peer = modelopt_student(bench, teachers, config_name)
            if peer is not None:
                qad(VARIANTS[key], peer, reuse=False)
    return rows


def combine(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per variant: the Spread of its step seconds over the rounds, its largest peak memory and
    the allocator retries of all rounds."""
    names = dict.fromkeys(name for round_rows in rounds for name in round_rows)
    return {name: {"seconds": Spread.of([r[name]["seconds"] for r in rounds if name in r]),
                   "peak GiB": max(r[name]["peak GiB"] for r in rounds if name in r),
                   "alloc retries": sum(r[name]["alloc retries"] for r in rounds if name in r),
                   "profile": next((r[name]["profile"] for r in rounds if "profile" in r.get(name, {})), None)}
            for name in names}


def report(rows: dict[str, dict], tokens_per_step: int) -> str:
    base = rows["BF16 training"]["seconds"]
    count = base.count
    lines = [f"| step | ms, median (min-max) of {count} | tokens/s (median) | x BF16 step | peak GiB | alloc retries |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        seconds = row["seconds"]
        claim = "1 (baseline)" if name == "BF16 training" else ratio_claim(seconds, base)
        lines.append(f"| {name} | {seconds.scaled(1e3).format(1)} | {tokens_per_step / seconds.median:,.0f} | "
                     f"{claim} | {row['peak GiB']:.1f} | {row['alloc retries']} |")
    if all(name in rows for name in ("QAD", "NVFP4 QAT", "teacher forward")):
        qad, qat, teacher = (rows[name]["seconds"].median for name in ("QAD", "NVFP4 QAT", "teacher forward"))
        lines += ["", "| where the QAD step's time goes (differences of medians) | ms | share of QAD step |",
                  "|---|---:|---:|"]
        for name, seconds in (("BF16 training step of the student", base.median),
                              ("NVFP4 fake quant (QAT - BF16)", qat - base.median),
                              ("teacher forward", teacher),
                              ("KL and the rest (QAD - QAT - teacher forward)", qad - qat - teacher)):
            lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / qad:.1%} |")
    for peer in (VARIANTS["modelopt"], VARIANTS["modelopt_mamba_moe"]):
        if peer in rows and "QAD" in rows:
            lines.append(f"\n{peer} / QAD = {ratio_claim(rows[peer]['seconds'], rows['QAD']['seconds'])}.")
    for name, row in rows.items():
        if row.get("profile"):
            lines += ["", f"Profile of one {name} step (torch.profiler, first round; its overhead is in the wall "
                          f"time):", "", row["profile"]]
    every = rows.get(VARIANTS["qad_every"])
    if every is not None and "QAD" in rows:
        lines.append(f"\nEach weight fake-quantized once per step instead of at every micro-batch: "
                     f"QAD / QAD with weights every micro-batch = {ratio_claim(rows['QAD']['seconds'], every['seconds'])}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/qwen2_1p5b_shape.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS, help="rounds over all variants")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated keys of the variants to run, bf16 among them ({', '.join(VARIANTS)})")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--profile", metavar="DIR", help="also profile one step of each variant into DIR")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key.path=value")
    args = parser.parse_intermixed_args()
    selected = set(args.variants.split(","))
    if not selected <= VARIANTS.keys() or "bf16" not in selected:
        raise SystemExit(f"--variants: {args.variants!r} must be keys of {', '.join(VARIANTS)}, bf16 among them")
    if not torch.cuda.is_available():
        raise SystemExit("bench_qad_step.py measures GPU steps: no CUDA device here")
    config = load_config(args.recipe, args.overrides)
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        bench = Bench(config, context, args.steps, args.warmup, args.profile)
        rounds = []
        for repeat in range(args.repeats):
            rounds.append(measure(bench, selected))
            bench.profile_dir = None  # profile the first round only
            if context.rank == 0:
                print(f"round {repeat + 1}/{args.repeats}: " + ", ".join(
                    f"{name} {row['seconds'] * 1e3:.1f} ms" for name, row in rounds[-1].items()), flush=True)
        rows = combine(rounds)
        if context.rank == 0:
            p = config.parallel
            header = (f"{torch.cuda.get_device_name()} x {torch.distributed.get_world_size()}, "
                      f"`{args.recipe}` {' '.join(args.overrides)} (TP={p.tensor_model_parallel_size}, "
                      f"PP={p.pipeline_model_parallel_size}, EP={p.expert_model_parallel_size}, "
                      f"DP={context.data_parallel_size}; {bench.micro_batches} micro-batches of "
                      f"{config.training.micro_batch_size} x {config.model.seq_length} tokens per step); each "
                      f"round the median of {args.steps} steps after {args.warmup}, {args.repeats} rounds "
                      f"interleaved")
            text = f"{header}\n\n{report(rows, bench.tokens_per_step)}\n"
            print(text, flush=True)
            if args.markdown:
                with open(args.markdown, "w") as out:
                    out.write(text)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
