"""The spread behind the layout tests' tolerances: each multi-process distillation step of
tests/test_distill_pipeline.py and tests/test_distill_layouts.py against its one-process
reference, at other model and data seeds than the tests' own.

    CUDA_VISIBLE_DEVICES= PYTHONPATH=$PWD python tests/measure_layout_spread.py 0,1,2,3 pp2,tp2,ep2,vpp,dp2

Prints one JSON line per seed (model.seed = 1234 + seed, micro-batch seed = seed): per layout the
KL's relative difference (``kl_rel``), the largest gradient difference (``max_abs``) and the
absolute tolerance the comparison needs at the test's relative one (``atol_needed_at_rtol``).
Seed 0 is the tests' own. About 3 CPU-minutes per seed and layout set on an idle 2-core machine.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import distill_helpers as dh  # noqa: E402
import test_distill_layouts as tl  # noqa: E402
import test_distill_pipeline as tp  # noqa: E402
from distill_helpers import micro_batches, plain_kl_and_grads, small_config, student_of  # noqa: E402
from distributed_helpers import run_distributed, single_process  # noqa: E402
from megatron_qad import quantize  # noqa: E402
from megatron_qad.distill import DistillationLoss, TeacherStudentStage, distillation_step, sum_reports  # noqa: E402
from megatron_qad.models import build_gpt_model  # noqa: E402


def gstats(got: dict, ref: dict, rtol: float) -> dict:
    """Largest |got - ref| over all gradients, and the atol that assert_close at ``rtol`` needs."""
    mx, need = 0.0, 0.0
    for k, g in got.items():
        d = (g.double() - ref[k].double()).abs()
        mx = max(mx, d.max().item())
        need = max(need, (d - rtol * ref[k].double().abs()).max().item())
    return dict(max_abs=mx, atol_needed_at_rtol=need)


def kl_rel(kl: float, ref: float) -> float:
    return abs(kl - ref) / ref


def run_seed(seed: int, which: list[str]) -> dict:
    """The differences of the layouts ``which`` at ``seed`` (see the module docstring)."""
    out = {}
    extra = [f"model.seed={1234 + seed}"]
    cfg = small_config(*extra)
    batches = micro_batches(cfg.model, seed=seed)
    with single_process(cfg.parallel):
        teacher = build_gpt_model(cfg.model, cfg.parallel)
        teacher_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in teacher.state_dict().items()}
        student = student_of(teacher_state, cfg)
        ref_kl, ref_grads = plain_kl_and_grads(student, teacher, batches)
        # pp1 schedule
        stage = TeacherStudentStage(student, teacher)
        reports = distillation_step(stage, iter(batches), dh.MICRO_BATCHES, dh.MICRO_BATCH_SIZE,
                                    cfg.model.seq_length, DistillationLoss("kl"))
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    out["pp1"] = dict(kl_rel=kl_rel(sum_reports(reports)["kl"][0].item(), ref_kl),
                      **gstats(grads, ref_grads, dh.GRAD_RTOL))
    if "pp2" in which:
        first, last = run_distributed(tp._pp2_rank, 2, teacher_state, batches, timeout_s=600)
        out["pp2"] = dict(kl_rel=kl_rel(sum_reports(last["reports"])["kl"][0].item(), ref_kl),
                          **gstats({**first["grads"], **last["grads"]}, ref_grads, dh.GRAD_RTOL))
    if "tp2" in which:
        ranks = run_distributed(tp._tp_rank, 2, tp.TP2, teacher_state, batches, timeout_s=600)
        out["tp2"] = dict(kl_rel=max(kl_rel(sum_reports(r["reports"])["kl"][0].item(), ref_kl) for r in ranks),
                          **gstats(tp._gather_tp_grads(ranks), ref_grads, tp.TP_GRAD_RTOL))
    if "tp2pp2" in which:
        ranks = run_distributed(tp._tp_rank, 4, [*tp.TP2, "parallel.pipeline_model_parallel_size=2"],
                                teacher_state, batches, timeout_s=600)
        stages = [sorted((r for r in ranks if r["pp_rank"] == pp), key=lambda r: r["tp_rank"]) for pp in (0, 1)]
        g = {**tp._gather_tp_grads(stages[0]), **tp._gather_tp_grads(stages[1])}
        out["tp2pp2"] = dict(kl_rel=max(kl_rel(sum_reports(r["reports"])["kl"][0].item(), ref_kl) for r in stages[1]),
                             **gstats(g, ref_grads, tp.TP_GRAD_RTOL))
    if "ep2" in which:
        with single_process(cfg.parallel):
            teacher = build_gpt_model(cfg.model, cfg.parallel)
            teacher.load_state_dict(teacher_state)
            student = build_gpt_model(cfg.model, cfg.parallel)
            generator = torch.Generator().manual_seed(7 + seed)
            with torch.no_grad():
                student.load_state_dict(teacher.state_dict())
                for param in student.parameters():
                    param.add_(0.02 * torch.randn(param.shape, generator=generator))
            student_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in student.state_dict().items()}
            ep_ref_kl, ep_ref_grads = plain_kl_and_grads(student, teacher, batches)
        results = run_distributed(tp._ep2_rank, 2, teacher_state, student_state, batches, timeout_s=600)
        kl = sum(sum_reports(r["reports"])["kl"][0].item() for r in results)
        grads = {}
        for r in results:
            for n, gr in r["grads"].items():
                grads[n] = grads[n] + gr if n in grads else gr
        out["ep2"] = dict(kl_rel=kl_rel(kl, ep_ref_kl), **gstats(grads, ep_ref_grads, tp.EP_RTOL))
    if "vpp" in which or "dp2" in which:
        cfg4 = small_config(*tl.FOUR_LAYERS, *extra)
        b4 = micro_batches(cfg4.model, seed=seed)
        with single_process(cfg4.parallel):
            teacher = build_gpt_model(cfg4.model, cfg4.parallel)
            ts4 = {k: v.clone() if torch.is_tensor(v) else v for k, v in teacher.state_dict().items()}
            student = build_gpt_model(cfg4.model, cfg4.parallel)
            student.load_state_dict(ts4)
            quantize.apply(student, "transformer")
            tl._calibrate_plainly(student, b4)
            amaxes = tl._amaxes(student)
            rkl, rgr = plain_kl_and_grads(student, teacher, b4)
        if "vpp" in which:
            first, last = run_distributed(tl._vpp_rank, 2, ts4, b4, timeout_s=600)
            got_am = {**first["amaxes"], **last["amaxes"]}
            out["vpp"] = dict(kl_rel=kl_rel(sum_reports(last["reports"])["kl"][0].item(), rkl),
                              amax_bits_equal=all(torch.equal(v, amaxes[k]) for k, v in got_am.items()),
                              **gstats({**first["grads"], **last["grads"]}, rgr, dh.GRAD_RTOL))
        if "dp2" in which:  # against the one-row reference, as the test compares
            rkl, rgr = tl.one_row_kl_and_grads(ts4, b4, amaxes)
            ranks = run_distributed(tl._dp2_ddp_rank, 2, ts4, b4, amaxes, timeout_s=600)
            kl, tokens = (sum(sum_reports(r["reports"])["kl"][i].item() for r in ranks) for i in (0, 1))
            am_rel = max(((v - amaxes[k]).abs() / amaxes[k].abs()).max().item()
                         for r in ranks for k, v in r["amaxes"].items())
            out["dp2"] = dict(kl_rel=kl_rel(kl, rkl), amax_rel=am_rel,
                              **gstats({n: g * tokens for n, g in ranks[0]["grads"].items()}, rgr, tl.DP_RTOL))
    return out


if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1].split(",")]
    which = sys.argv[2].split(",")
    for seed in seeds:
        t = time.time()
        res = run_seed(seed, which)
        print(json.dumps({"seed": seed, "seconds": round(time.time() - t), **res}), flush=True)
