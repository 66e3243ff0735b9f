"""Names of the profiler ranges a QAD step marks (``torch.profiler.record_function``), so that a
profile of the step can be summarised by phase (``benchmarks/step_profile.py``). A range costs
a few microseconds when no profiler runs; each is entered once per micro-batch."""

TEACHER_FORWARD = "qad: teacher forward"
STUDENT_FORWARD = "qad: student forward"
LOSS = "qad: loss"
