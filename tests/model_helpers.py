"""Small pieces the model tests share: batches for the tiny recipes and expert renumbering."""

import re

import torch
from megatron.core import parallel_state

from megatron_qad.models import causal_attention_mask


def make_batches(model_cfg, count: int = 2, seed: int = 0):
    """``count`` batches of (tokens [2, s], positions [2, s], causal mask [1, 1, s, s])."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(model_cfg.seq_length).expand(2, -1)
    mask = causal_attention_mask(model_cfg.seq_length)
    return [(torch.randint(0, model_cfg.vocab_size, (2, model_cfg.seq_length), generator=generator),
             positions, mask) for _ in range(count)]


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """The EP=1 name of this expert-parallel rank's ``local_experts.{i}`` entry (other names unchanged)."""
    return re.sub(r"local_experts\.(\d+)\.",
                  lambda match: f"local_experts.{ep_rank * local_experts + int(match.group(1))}.", name)


def load_with_experts_renumbered(model, full_state_dict: dict) -> tuple[int, int]:
    """Load an EP=1 state dict into this rank's (possibly expert-parallel) model; return
    (expert-parallel rank, local experts per layer)."""
    local_experts = len(model.decoder.layers[0].mlp.experts.local_experts)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    model.load_state_dict({key: full_state_dict[global_expert_name(key, ep_rank, local_experts)]
                           for key in model.state_dict()})
    return ep_rank, local_experts
