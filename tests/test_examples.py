"""The example scripts run as users run them (torchrun, CPU processes)."""

import pytest

from torchrun_helpers import ROOT, json_lines, torchrun

RECIPE = "configs/tiny_cpu.yaml"
SMALL = ["model.params_dtype=float32", "model.num_layers=2", "model.seq_length=32"]
# Two-process runs against the one-process run, measured at model.seed 1234-1237 (1234 is the
# test's) over both steps: PP=2 gives the same KL bit for bit and the gradient norm to 1.1e-7
# relative; EP=2 the KL to 3.4e-6 (seed 1235; 0 at the others) and the gradient norm to 1.6e-7.
KL_RTOL, GRAD_NORM_RTOL = 2e-5, 1e-5


def _torchrun(processes: int, script: str, *args: str) -> list[dict]:
    """Run ``script`` under torchrun on CPU processes; return its JSON output lines."""
    return json_lines(torchrun(processes, str(ROOT / script), *args))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Two QAD steps in one process; it also writes the teacher checkpoint the other layouts load."""
    checkpoint = str(tmp_path_factory.mktemp("distill_layouts") / "teacher")
    return checkpoint, _torchrun(1, "examples/distill_layouts.py", RECIPE, checkpoint, *SMALL, "--steps", "2")


@pytest.mark.parametrize("overrides, layout", [
    (["parallel.pipeline_model_parallel_size=2"], {"tp": 1, "pp": 2, "vpp": 1, "dp": 1}),
    (["parallel.expert_model_parallel_size=2"], {"tp": 1, "pp": 1, "vpp": 1, "dp": 2}),
])
def test_distill_layouts_two_process_run_repeats_the_one_process_run(one_process_run, overrides, layout):
    """The same global batch and checkpoint at PP=2 or at EP=2 (= DP=2) give the one-process KL
    and gradient norm per step (fp32; DP=2 splits each micro-batch's rows)."""
    checkpoint, one = one_process_run
    two = _torchrun(2, "examples/distill_layouts.py", RECIPE, checkpoint, *SMALL, *overrides, "--steps", "2")
    assert [line["layout"] for line in two] == [layout] * 2
    assert [line["step"] for line in one] == [line["step"] for line in two] == [0, 1]
    for a, b in zip(one, two):
        assert a["kl"] > 0
        assert b["kl"] == pytest.approx(a["kl"], rel=KL_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL)
