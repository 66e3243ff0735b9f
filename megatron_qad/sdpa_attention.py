"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (``model.core_attention: sdpa``).

megatron.core's local spec computes attention unfused (``DotProductAttention``): the scores
``[b, heads, s, s]`` are written out, masked and soft-maxed in separate passes and kept for the
backward pass, which at 1024 tokens costs more time and memory than the projections around it in a
small model. :class:`SdpaAttention` is the same module (same constructor, same inputs and outputs,
no parameters, so checkpoints do not change) with the product computed by PyTorch's fused kernels
(FlashAttention on a GPU for a causal mask; the memory-efficient kernel for any other mask; the
plain math path on the CPU). :func:`with_core_attention` puts it into a layer spec at construction.

Masks follow megatron.core (bool, True = forbidden). The mask every training step passes,
:func:`causal_attention_mask`, is recognised by identity (one cached tensor per length and device)
and computed as ``is_causal``; any other mask (left padding in chat evaluation) is applied as given.
"""

import dataclasses
import functools

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec


@functools.lru_cache(maxsize=8)
def _causal_mask(seq_length: int, device: str) -> torch.Tensor:
    return torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(diagonal=1)[None, None]


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[1, 1, s, s]`` mask, True where attention is forbidden (key after query); one shared,
    never modified tensor per ``(seq_length, device)``.

    megatron.core builds this mask on "cuda" when given None, so CPU runs pass it explicitly.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one tensor for "cuda" and "cuda:<current>"
        device = torch.device("cuda", torch.cuda.current_device())
    return _causal_mask(seq_length, str(device))


class SdpaAttention(DotProductAttention):
    """megatron.core's ``DotProductAttention`` computed by ``scaled_dot_product_attention``.

    Inputs: query ``[sq, b, heads, head_dim]``, key and value ``[sk, b, groups, head_dim]`` (grouped
    query attention repeats each group over its heads, as megatron.core does), ``attention_mask``
    bool ``[b or 1, 1, sq, sk]`` or None (causal). Output ``[sq, b, heads * head_dim]`` in the
    inputs' dtype. No dropout, softmax offset, sliding window or packed sequences (the models here
    build none of them; ValueError otherwise).
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if self.attention_dropout.p or self.softmax_offset is not None or self.config.window_size is not None:
            raise ValueError("model.core_attention=sdpa builds attention without dropout, softmax offset or "
                             "sliding window; use model.core_attention=local")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("model.core_attention=sdpa takes no packed sequences or attention bias; "
                             "use model.core_attention=local")
        repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeats > 1:
            key, value = key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)
        # [s, b, heads, head_dim] -> [b, heads, s, head_dim]
        query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))
        sq, sk = query.shape[2], key.shape[2]
        causal = attention_mask is None or attention_mask is causal_attention_mask(sq, query.device)
        if causal and sq != sk:
            raise ValueError(f"model.core_attention=sdpa: a causal mask needs as many queries as keys "
                             f"(got {sq} and {sk})")
        # megatron.core's layer scaling divides the scale by the layer number and the softmax multiplies it back.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        context = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=None if causal else ~attention_mask, is_causal=causal, scale=scale)
        # [b, heads, sq, head_dim] -> [sq, b, heads * head_dim]
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], self.hidden_size_per_partition)


def with_core_attention(layer_spec: ModuleSpec, core_attention: str) -> ModuleSpec:
    """``layer_spec`` (a megatron.core layer spec with ``self_attention``) with its core attention
    built as ``core_attention`` asks: "local" (megatron.core's ``DotProductAttention``, unchanged) or
    "sdpa" (:class:`SdpaAttention`)."""
    if core_attention == "local":
        return layer_spec
    attention = layer_spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                              core_attention=SdpaAttention))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                          self_attention=attention))
