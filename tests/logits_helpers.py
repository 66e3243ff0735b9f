"""Logits of an imported model at a tensor-parallel layout, in a child process of
``run_distributed`` (kept apart from the test module so that children do not import transformers)."""

from pathlib import Path

import torch


def tensor_parallel_logits(out: str, ids: torch.Tensor, tp: int) -> torch.Tensor:
    """fp32 logits [b, s, V] (gathered over TP) of the model ``out/model.yaml`` describes, loaded
    from the dist checkpoint at ``out``, at tensor-parallel size ``tp`` on gloo."""
    from megatron.core import tensor_parallel

    from megatron_qad import parallel
    from megatron_qad.config import load_config
    from megatron_qad.models import build_model, causal_attention_mask
    from megatron_qad.train.checkpointing import load_model

    seq = ids.shape[1]
    config = load_config(Path(out) / "model.yaml", [f"model.seq_length={seq}",
                                                      f"parallel.tensor_model_parallel_size={tp}"])
    parallel.initialize(config.parallel, backend="gloo", seed=config.model.seed)
    try:
        model = build_model(config.model, config.parallel).eval()
        load_model([model], out)
        with torch.no_grad():
            positions = torch.arange(seq).expand(ids.shape[0], -1)
            logits = model(ids, positions, causal_attention_mask(seq))
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits).float()
    finally:
        parallel.destroy()
