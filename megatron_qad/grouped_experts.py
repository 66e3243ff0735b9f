"""Grouped-GEMM experts for megatron.core's local spec: ``model.moe_grouped_gemm: true`` without
Transformer Engine.

megatron.core's local spec runs a MoE layer's experts as ``SequentialMLP``: one ``MLP`` per local
expert, so per micro-batch two GEMMs, an activation and their backward per expert (with 64-128
experts, hundreds of kernel launches a layer, which leave the GPU idle while the host issues them).
:class:`GroupedGemmSequentialMLP` keeps ``SequentialMLP``'s parameters, names and checkpoint keys
(per-expert ``linear_fc1`` / ``linear_fc2`` weights: import, export and dist checkpoints are the
same) and computes its forward as one grouped GEMM for all experts' ``linear_fc1``, the activation
over all tokens at once, and one grouped GEMM for ``linear_fc2``
(``torch.nn.functional.grouped_mm`` over the experts' weights stacked each call). The grouped
kernel sums each dot product in fp32 in another order than the per-expert GEMMs, so its outputs and
gradients may differ from ``SequentialMLP``'s in their last bf16 bits (on the CPU, torch's
fallback runs one matmul per expert: the same values).

The grouped forward applies where it computes what ``SequentialMLP`` computes without the experts'
own forward: more than one local expert, no bias, no FP8 / FP4 training recipe, weight gradients
computed in the backward (not ``delay_wgrad_compute``), probabilities applied after the
activation, megatron.core's activation (not Transformer Engine's; a fused one only for SwiGLU),
and on a GPU bf16 with widths multiples of 8 (grouped_mm's layout); elsewhere ``SequentialMLP``'s
own forward runs. Under expert tensor or expert
parallelism megatron.core's expert linear layers communicate nothing themselves
(``explicit_expert_comm``: the token dispatcher gathers and reduces), so each rank's grouped GEMMs
over its weight shards compute what its experts' linear layers would. The NVFP4 student of such a
model (``quantize.grouped_mlp``) fake-quantizes the stacked weights in one launch per role and
runs the same grouped GEMMs.
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.moe.experts import SequentialMLP


class _GroupedExpertGEMM(torch.autograd.Function):
    """``x @ weight[i].T`` for each expert's rows of x, as one grouped GEMM forward and two backward.

    x: [tokens, K] bf16; weights: [E, N, K] bf16; ends: int32 [E] on x's device, the end row of each
    expert's tokens; empty: the experts routed no tokens (their weight gradient is 0).
    """

    @staticmethod
    def forward(ctx, x, weights, ends, empty):
        ctx.save_for_backward(x, weights, ends)
        ctx.empty = empty
        return F.grouped_mm(x, weights.transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, grad):
        x, weights, ends = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = F.grouped_mm(grad, weights, offs=ends) if ctx.needs_input_grad[0] else None
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = F.grouped_mm(grad.t(), x, offs=ends)
            for expert in ctx.empty:
                grad_weights[expert].zero_()
        return grad_x, grad_weights, None, None


def grouped_expert_gemm(x: torch.Tensor, weights: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
    """[tokens, N]: each expert's rows of x [tokens, K] times its weight of weights [E, N, K] transposed
    (bf16, one grouped GEMM; ``m_splits`` the host token counts)."""
    ends = torch.tensor(m_splits, dtype=torch.int64).cumsum(0).to(torch.int32)
    ends = ends.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else ends
    empty = [expert for expert, rows in enumerate(m_splits) if rows == 0]
    return _GroupedExpertGEMM.apply(x, weights, ends, empty)


def grouped_mm_takes(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`grouped_expert_gemm` takes tokens x [tokens, K] with experts' weights of these
    shapes ([N, K] each): on a GPU bf16 throughout and every width a multiple of 8 (grouped_mm's
    kernel layout); on the CPU any (torch's fallback runs one matmul per expert)."""
    if not x.is_cuda:
        return True
    return x.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 and w.shape[0] % 8 == 0 and w.shape[1] % 8 == 0
                                             for w in weights)


def expert_activation(config, activation_func, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``MLP.forward`` between its two linear layers for experts without bias and without a
    Transformer Engine activation module: x [tokens, fc1 width of this rank] (the fc1 output),
    probs [tokens] (the router's, usually fp32) as ``per_token_scale``. Returns [tokens, fc2 input
    width of this rank] in x's dtype. Elementwise per token, so one call over all experts' tokens
    gives each expert's values."""
    scale = probs.unsqueeze(-1)
    if config.bias_activation_fusion:  # SwiGLU only (see forward_applies)
        return weighted_bias_swiglu_impl(x, None, scale, config.activation_func_fp8_input_store)
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        x = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    else:
        x = activation_func(x)
    original_dtype = x.dtype
    return (x * scale).to(original_dtype)


def forward_applies(module: SequentialMLP) -> bool:
    """Whether the experts' forward can run outside each expert's ``MLP.forward``: one call of
    :func:`expert_activation` over all tokens between the linear layers (the grouped quantizers
    of ``quantize.grouped_mlp`` and the grouped GEMMs here)."""
    config = module.config
    fused_swiglu = config.gated_linear_unit and config.activation_func is F.silu
    return not (module.num_local_experts == 1 or config.fp8 or config.fp4 or config.moe_apply_probs_on_input
                or config.add_bias_linear or config.use_te_activation_func
                or (config.bias_activation_fusion and not fused_swiglu))


class GroupedGemmSequentialMLP(SequentialMLP):
    """``SequentialMLP`` (same parameters and checkpoint) whose experts' GEMMs run as one grouped
    GEMM per linear layer (module docstring)."""

    def grouped_gemm_applies(self, x: torch.Tensor) -> bool:
        """Whether the grouped GEMMs compute this call's forward (module docstring); x: the tokens."""
        expert = self.local_experts[0]  # the experts' weights share their shapes and dtype
        return (forward_applies(self) and not self.config.delay_wgrad_compute and x.dim() == 2 and x.shape[0] > 0
                and grouped_mm_takes(x, (expert.linear_fc1.weight, expert.linear_fc2.weight)))

    def stacked_weights(self, linear_name: str) -> torch.Tensor:
        """[experts, N, K]: the local experts' ``linear_name`` weights stacked (a copy; gradients flow
        back to each expert's weight)."""
        return torch.stack([getattr(expert, linear_name).weight for expert in self.local_experts])

    def grouped_forward(self, x: torch.Tensor, m_splits: list[int], probs: torch.Tensor,
                        fc1_weights: torch.Tensor, fc2_weights: torch.Tensor, quantize_fc2_input=None) -> torch.Tensor:
        """fc1 -> activation -> (``quantize_fc2_input``) -> fc2 of every expert: x [tokens, hidden],
        ``m_splits`` each expert's token count (host ints), probs [tokens], weights [E, N, K].
        Returns [tokens, hidden]."""
        h = expert_activation(self.config, self.local_experts[0].activation_func,
                              grouped_expert_gemm(x, fc1_weights, m_splits), probs)
        if quantize_fc2_input is not None:
            h = quantize_fc2_input(h)
        return grouped_expert_gemm(h, fc2_weights, m_splits)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """As ``SequentialMLP.forward``: permuted_local_hidden_states [tokens, hidden], the local
        experts' tokens one expert after another; tokens_per_expert: int [local experts];
        permuted_probs [tokens]. Returns ``(output [tokens, hidden], None)``."""
        x = permuted_local_hidden_states
        if not self.grouped_gemm_applies(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        output = self.grouped_forward(x, tokens_per_expert.tolist(), permuted_probs,
                                      self.stacked_weights("linear_fc1"), self.stacked_weights("linear_fc2"))
        return output, None


class LocalSpecWithGroupedGemm(LocalSpecProvider):
    """megatron.core's local spec provider, whose experts under ``moe_grouped_gemm`` are
    :class:`GroupedGemmSequentialMLP` (megatron.core's own builds ``SequentialMLP`` either way)."""

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        experts = super().grouped_mlp_modules(moe_use_grouped_gemm)
        if not moe_use_grouped_gemm:
            return experts
        if experts.func is not SequentialMLP:
            raise TypeError(f"megatron.core's local spec builds {experts.func.__name__} experts, expected SequentialMLP")
        return partial(GroupedGemmSequentialMLP, *experts.args, **experts.keywords)
