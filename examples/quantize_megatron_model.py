"""Turn a megatron.core model into an NVFP4 student, calibrate it, and compare it with its BF16 self.

    .venv/bin/python examples/quantize_megatron_model.py [configs/tiny_cpu.yaml] [key=value ...]

Runs as one process (the CPU when no GPU is visible; under torchrun every rank takes its shard).
"""

import sys

import torch
import torch.nn.functional as F

from megatron_qad import models, parallel, quantize
from megatron_qad.config import load_config


def main(argv: list[str]) -> None:
    recipe = argv[0] if argv else "configs/tiny_cpu.yaml"
    config = load_config(recipe, argv[1:] + ["model.params_dtype=float32"])
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        model = models.build_model(config.model, config.parallel, context.device)
        seq, vocab = config.model.seq_length, config.model.vocab_size
        tokens = torch.randint(0, vocab, (4, seq), device=context.device)
        positions = torch.arange(seq, device=context.device).expand(4, -1)
        mask = models.causal_attention_mask(seq, context.device)
        with torch.no_grad():
            bf16_logits = model(tokens, positions, mask)

        report = quantize.apply(model, config.quantization.to_policy())
        quantize.calibrate(model, [(tokens[:2], positions[:2], mask)])  # static input and K/V scales
        with torch.no_grad():
            student_logits = model(tokens, positions, mask)
        if context.rank == 0:
            print(report.format_table().splitlines()[-1])
            if config.parallel.tensor_model_parallel_size == 1:  # full vocabulary on this rank
                kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(bf16_logits.float(), -1),
                              log_target=True, reduction="none").sum(-1).mean()
                agree = (student_logits.argmax(-1) == bf16_logits.argmax(-1)).float().mean()
                print(f"KL(BF16 || NVFP4 student) per token: {kl:.4e}; top-1 agreement {agree:.3f}")
        quantize.remove(model)
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
