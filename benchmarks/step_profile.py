"""Where one profiled QAD step's GPU time goes, by phase.

The package marks the teacher's forward, the student's forward and the loss of every micro-batch
with profiler ranges (:mod:`megatron_qad.profiling`); the benchmark marks the optimizer step
(:data:`OPTIMIZER_STEP`). From the events of ``torch.profiler`` over one step, :func:`phase_times`
sums the GPU kernel time launched inside each range; every other kernel (the backward pass, the
gradient reduction, zeroing the buffers, and the whole forward of a step without a teacher, whose
model enters no range) is "backward and the rest". The NVFP4 / FP8 fake-quant
kernels (:data:`FAKE_QUANT_KERNELS`, in whichever phase they run) are summed apart as well.
Kernels are attributed through the CPU operator that launched them; a kernel with no launching
operator in the profile is not counted.
"""

from torch.autograd import DeviceType

from megatron_qad.profiling import LOSS, STUDENT_FORWARD, TEACHER_FORWARD

OPTIMIZER_STEP = "qad: optimizer step"
PHASES = (TEACHER_FORWARD, STUDENT_FORWARD, LOSS, OPTIMIZER_STEP)
REST = "backward and the rest (a step without a teacher: its forward too)"
ALL_KERNELS = "all kernels"
FAKE_QUANT = "of them fake-quant kernels (NVFP4 weights and inputs, FP8 K/V)"
FAKE_QUANT_KERNELS = ("_nvfp4_kernel", "_segments_fake_quant_kernel", "_segments_amax_kernel",
                      "_partial_abs_max_kernel", "_reduce_max_kernel", "_fp8_e4m3_kernel")
"""The Triton kernels of :mod:`megatron_qad.numerics` that fake-quantize (block scales, tensor
amax, rounding), by function name."""


def phase_times(events) -> dict[str, float]:
    """GPU kernel microseconds of one profiled step: each of :data:`PHASES` (kernels launched inside
    its ranges, summed over micro-batches), :data:`REST`, :data:`ALL_KERNELS` and
    :data:`FAKE_QUANT`. ``events``: ``profiler.events()`` of ``torch.profiler.profile``."""
    operators = [event for event in events if event.device_type == DeviceType.CPU]
    kernels = [kernel for event in operators for kernel in event.kernels]
    times = {phase: float(sum(event.device_time_total for event in operators if event.name == phase))
             for phase in PHASES}
    total = float(sum(kernel.duration for kernel in kernels))
    times[REST] = total - sum(times.values())
    times[ALL_KERNELS] = total
    times[FAKE_QUANT] = float(sum(kernel.duration for kernel in kernels
                                  if any(name in kernel.name for name in FAKE_QUANT_KERNELS)))
    return times


def phase_table(times: dict[str, float], wall_us: float, timed_us: float | None = None) -> str:
    """Markdown: GPU milliseconds and share of the step's wall time per phase, and the time the GPU
    ran no kernel (wall - all kernels: host-bound gaps). ``wall_us``: the profiled step's wall time,
    which the profiler's own host work lengthens; ``timed_us`` (optional): the unprofiled step's
    timed median, against which the idle time is given once more (the kernels barely slow down
    under the profiler, the host does)."""
    lines = ["| phase of the profiled step | GPU kernel ms | share of the step's wall time |", "|---|---:|---:|"]
    rows = [*((phase.removeprefix("qad: "), times[phase]) for phase in PHASES), (REST, times[REST]),
            (ALL_KERNELS, times[ALL_KERNELS]), (FAKE_QUANT, times[FAKE_QUANT]),
            ("no kernel running (wall - all kernels)", wall_us - times[ALL_KERNELS])]
    for name, microseconds in rows:
        lines.append(f"| {name} | {microseconds / 1e3:.1f} | {microseconds / wall_us:.1%} |")
    if timed_us is not None:
        idle = timed_us - times[ALL_KERNELS]
        lines.append(f"| no kernel running in the timed step (its median {timed_us / 1e3:.1f} ms - all kernels) | "
                     f"{idle / 1e3:.1f} | {idle / timed_us:.1%} of the timed step |")
    return "\n".join(lines)
