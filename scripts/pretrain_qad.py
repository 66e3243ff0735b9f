#!/usr/bin/env python3
"""QAD from a Megatron-LM command line: Megatron's flags plus the QAD flags.

    torchrun --nproc-per-node 8 scripts/pretrain_qad.py \\
        --num-layers 32 --hidden-size 4096 ... (the model and training flags of the BF16 job) \\
        --qad-teacher-load /ckpt/bf16-model  (a Megatron-LM checkpoint directory) \\
        --qad-loss kl --qad-quant-format nvfp4 --qad-kv-cache fp8 \\
        --save /ckpt/qad --load /ckpt/qad --save-interval 500 --exit-signal-handler

Every Megatron-LM flag works as in ``pretrain_gpt.py`` / ``pretrain_mamba.py`` (parallel sizes,
``--data-path`` blends or ``--mock-data``, checkpointing, ``--exit-duration-in-mins``, logging);
``--help`` lists Megatron-LM's flags and, under "QAD (megatron_qad)", the QAD flags. The student
starts from the teacher's weights, is quantized to NVFP4 and calibrated (PTQ) on a fresh run, then
trained with KL(teacher || student) in Megatron's own training loop. The run ends with a few lines
for a person (PTQ and final KL, CE, top-1 agreement, tokens, time, where the student is) and one
``summary {...}`` line; with ``--save`` the whole record goes to ``SAVE/summary.json``
(``--qad-console quiet`` keeps Megatron's own output in ``SAVE/megatron.log``). Exit code:
Megatron's (0 when the run finished or stopped to be resumed).
"""

import sys

from megatron_qad.cli import run_megatron_command_line

if __name__ == "__main__":
    sys.exit(run_megatron_command_line(sys.argv[1:]))
