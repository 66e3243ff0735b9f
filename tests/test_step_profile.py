"""The QAD step's profiler ranges and benchmarks/step_profile.py's phase summary: the ranges are
entered by a real teacher-student step through megatron.core's schedule (CPU profile, gloo), and
the summary's sums are checked on hand-built profiler events (a CPU run launches no kernels)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.profiler_util import FunctionEvent

from distill_helpers import MICRO_BATCH_SIZE, micro_batches, small_config, student_of
from distributed_helpers import single_process
from megatron_qad.distill import DistillationLoss, TeacherStudentStage, distillation_step
from megatron_qad.models import build_gpt_model
from megatron_qad.profiling import LOSS, STUDENT_FORWARD, TEACHER_FORWARD


@pytest.fixture
def step_profile(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    yield importlib.import_module("step_profile")
    sys.modules.pop("step_profile", None)


def test_every_micro_batch_enters_the_three_ranges():
    cfg = small_config()
    batches = micro_batches(cfg.model, count=3)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        stage = TeacherStudentStage(student_of(teacher.state_dict(), cfg), teacher)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            distillation_step(stage, iter(batches), 3, MICRO_BATCH_SIZE, cfg.model.seq_length, DistillationLoss("kl"))
    names = [event.name for event in profiler.events()]
    assert [names.count(name) for name in (TEACHER_FORWARD, STUDENT_FORWARD, LOSS)] == [3, 3, 3]


def operator(name: str, start: int, end: int, kernels=(), children=()) -> FunctionEvent:
    event = FunctionEvent(id=start, name=name, thread=0, start_us=start, end_us=end, use_device="cuda")
    for kernel_name, microseconds in kernels:
        event.append_kernel(kernel_name, 0, microseconds)
    for child in children:
        event.append_cpu_child(child)
    return event


def test_phases_sum_the_kernels_launched_inside_their_ranges(step_profile):
    matmul = operator("aten::mm", 1, 2, kernels=[("sm90_gemm", 300.0)])
    quantize = operator("triton", 2, 3, kernels=[("_nvfp4_kernel", 40.0), ("_partial_abs_max_kernel", 10.0)])
    events = [operator(TEACHER_FORWARD, 0, 10, children=[matmul]), matmul,
              operator(STUDENT_FORWARD, 10, 20, kernels=[("elementwise", 5.0)], children=[quantize]), quantize,
              operator(LOSS, 20, 30, kernels=[("_statistics_kernel", 20.0)]),
              operator(TEACHER_FORWARD, 30, 40, kernels=[("sm90_gemm", 100.0)]),  # a second micro-batch
              operator("autograd::engine::evaluate_function", 40, 50, kernels=[("sm90_gemm", 600.0)]),
              operator(step_profile.OPTIMIZER_STEP, 50, 60, kernels=[("multi_tensor_apply", 25.0)])]
    times = step_profile.phase_times(events)
    assert times == {TEACHER_FORWARD: 400.0, STUDENT_FORWARD: 55.0, LOSS: 20.0, step_profile.OPTIMIZER_STEP: 25.0,
                     step_profile.REST: 600.0, step_profile.ALL_KERNELS: 1100.0, step_profile.FAKE_QUANT: 50.0}
    table = step_profile.phase_table(times, wall_us=2000.0)
    assert "| teacher forward | 0.4 | 20.0% |" in table
    assert "| no kernel running (wall - all kernels) | 0.9 | 45.0% |" in table
    timed = step_profile.phase_table(times, wall_us=2000.0, timed_us=1600.0)
    assert timed.startswith(table)
    assert timed.endswith("| no kernel running in the timed step (its median 1.6 ms - all kernels) | 0.5 | "
                          "31.2% of the timed step |")


def test_the_fake_quant_kernel_names_are_the_numerics_kernels(step_profile):
    pytest.importorskip("triton")
    modules = [importlib.import_module(f"megatron_qad.numerics.{name}")
               for name in ("nvfp4_triton", "nvfp4_grouped_triton", "amax_triton", "fp8_triton")]
    defined = {name for module in modules for name in vars(module)}
    assert set(step_profile.FAKE_QUANT_KERNELS) <= defined
