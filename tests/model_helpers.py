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


def expert_layout(model) -> tuple[int, int]:
    """(expert-parallel rank, local experts per MoE layer) of this rank's model."""
    return (parallel_state.get_expert_model_parallel_rank(),
            len(model.decoder.layers[0].mlp.experts.local_experts))


def load_with_experts_renumbered(model, full_state_dict: dict) -> None:
    """Load an EP=1 state dict into this rank's (possibly expert-parallel) model."""
    ep_rank, local_experts = expert_layout(model)
    model.load_state_dict({key: full_state_dict[global_expert_name(key, ep_rank, local_experts)]
                           for key in model.state_dict()})


def build_at_layout(config, device, state_dict_path: str | None = None):
    """(model, expert-parallel rank, local experts per MoE layer) of this rank's GPT model of
    ``config``, loaded from the EP=1 state dict saved at ``state_dict_path`` when given."""
    from megatron_qad.models import build_gpt_model

    model = build_gpt_model(config.model, config.parallel, device)
    ep_rank, local_experts = expert_layout(model)
    if state_dict_path:
        load_with_experts_renumbered(model, torch.load(state_dict_path))
    return model, ep_rank, local_experts


def assert_trains_in_bf16(model, model_cfg) -> None:
    """bf16 forward on a fixed batch gives finite logits [b, s, V]; backward reaches every parameter."""
    logits = model(*make_batches(model_cfg, count=1)[0])
    assert logits.shape == (2, model_cfg.seq_length, model_cfg.vocab_size)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
