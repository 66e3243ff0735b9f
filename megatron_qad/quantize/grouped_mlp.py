"""Grouped fake quant for megatron.core's ``SequentialMLP`` (the local spec's MoE experts).

``SequentialMLP`` runs each local expert's ``MLP`` in turn, and each expert's quantized linear
layer (``layers.QuantizedLinear``) fake-quantizes its own input and weight: per micro-batch,
experts x 2 layers x (amax + fake quant) small launches. When the policy quantizes every local
expert's ``linear_fc1`` and ``linear_fc2``, the ``SequentialMLP``'s class is swapped for a subclass
(parameters, names and checkpoint keys unchanged) whose forward runs the quantizers of each role
together (:mod:`.grouped`): all experts' fc1 inputs in one fake-quant launch, all fc1 weights in
another (held across micro-batches under ``reuse_quantized_weights``), then the same for fc2. Each
expert's GEMMs still run in its own linear layers (:func:`layers.given_operands`: the layer's
forward and tensor-parallel communication, without its quantizers), and the activation and router
probabilities are applied as megatron.core's ``MLP.forward`` applies them, with the same ops in
the same order: outputs and gradients equal the per-expert path's bit for bit. Experts built with
``model.moe_grouped_gemm`` (:class:`~megatron_qad.grouped_experts.GroupedGemmSequentialMLP`) run
their GEMMs grouped instead, over the stacked quantized weights, where their grouped GEMM applies.

The experts run one by one, each quantizing for itself, where the grouped forward does not apply:
while calibrating (each expert observes its own amax), one local expert, Transformer Engine's own
FP8 / FP4 training (token padding), ``moe_apply_probs_on_input``, biases, a Transformer Engine
activation module, a fused activation other than SwiGLU, or quantizers that cannot run as one
group (``grouped.can_group``).
"""

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from ..grouped_experts import GroupedGemmSequentialMLP, expert_activation, forward_applies
from . import grouped
from .layers import QuantizedLinear, _quantized_class, given_operands
from .quantizer import TensorQuantizer

_ROLES = (("linear_fc1", "input_quantizer"), ("linear_fc1", "weight_quantizer"),
          ("linear_fc2", "input_quantizer"), ("linear_fc2", "weight_quantizer"))


class QuantizedSequentialMLP:
    """Mixin put in front of ``SequentialMLP`` (see :func:`quantize_sequential_mlp`): the grouped
    forward of the module docstring, or ``SequentialMLP``'s own where it does not apply."""

    def _grouped_roles(self) -> list[list[TensorQuantizer] | None] | None:
        """The experts' quantizers of each role (fc1 input, fc1 weight, fc2 input, fc2 weight) as a
        list per role, None for a role every expert keeps in BF16; None when the experts must run
        one by one."""
        if not forward_applies(self):
            return None
        roles = []
        for linear_name, role in _ROLES:
            quantizers = [getattr(getattr(expert, linear_name), role) for expert in self.local_experts]
            if all(quantizer is None for quantizer in quantizers):
                roles.append(None)
            elif all(quantizer is not None for quantizer in quantizers) and grouped.can_group(quantizers):
                roles.append(quantizers)
            else:
                return None
        return roles

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """permuted_local_hidden_states [tokens, hidden] (the parameters' dtype), the local experts'
        tokens one expert after another; tokens_per_expert: int [local experts], their counts;
        permuted_probs [tokens]: each token's router probability. Returns ``(output [tokens,
        hidden], None)`` as ``SequentialMLP.forward`` does."""
        roles = self._grouped_roles()
        if roles is None:  # each expert's own quantized layers (not a grouped GEMM of BF16 weights)
            return SequentialMLP.forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        fc1_inputs, fc1_weights, fc2_inputs, fc2_weights = roles
        experts = list(self.local_experts)
        m_splits = tokens_per_expert.tolist()
        x = permuted_local_hidden_states
        grouped_gemm = isinstance(self, GroupedGemmSequentialMLP) and self.grouped_gemm_applies(x)

        def quantized_weights(quantizers, linear_name):
            weights = [getattr(expert, linear_name).weight for expert in experts]
            if quantizers is None:
                return torch.stack(weights) if grouped_gemm else weights
            return grouped.fake_quantize_weights(quantizers, weights, stacked=grouped_gemm)

        def quantized_tokens(quantizers, tokens):
            return tokens if quantizers is None else grouped.fake_quantize_tokens(quantizers, tokens, m_splits)

        x = quantized_tokens(fc1_inputs, x)
        if grouped_gemm:
            output = self.grouped_forward(x, m_splits, permuted_probs, quantized_weights(fc1_weights, "linear_fc1"),
                                          quantized_weights(fc2_weights, "linear_fc2"),
                                          lambda h: quantized_tokens(fc2_inputs, h))
            return output, None
        intermediates = []
        for expert, tokens, probs, weight in zip(experts, torch.split(x, m_splits),
                                                 torch.split(permuted_probs, m_splits),
                                                 quantized_weights(fc1_weights, "linear_fc1")):
            with given_operands(expert.linear_fc1, weight):
                intermediate, _ = expert.linear_fc1(tokens)
            intermediates.append(expert_activation(self.config, expert.activation_func, intermediate, probs))
        h = quantized_tokens(fc2_inputs, torch.cat(intermediates))
        outputs = []
        for expert, tokens, weight in zip(experts, torch.split(h, m_splits),
                                          quantized_weights(fc2_weights, "linear_fc2")):
            with given_operands(expert.linear_fc2, weight):
                output, _ = expert.linear_fc2(tokens)
            outputs.append(output)
        return torch.cat(outputs), None


def groups_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a ``SequentialMLP`` whose local experts are plain ``MLP`` layers with
    quantized local linear layers (``linear_fc1`` and ``linear_fc2`` of every expert), which
    :func:`quantize_sequential_mlp` can give the grouped forward."""
    return (isinstance(module, SequentialMLP) and not isinstance(module, QuantizedSequentialMLP)
            and all(type(expert) is MLP and isinstance(expert.linear_fc1, QuantizedLinear)
                    and isinstance(expert.linear_fc2, QuantizedLinear) for expert in module.local_experts))


def quantize_sequential_mlp(module: SequentialMLP) -> None:
    """Give ``module`` (see :func:`groups_experts`) the grouped forward, in place."""
    module.__class__ = _quantized_class(type(module), QuantizedSequentialMLP)


def is_quantized_sequential_mlp(module: torch.nn.Module) -> bool:
    return isinstance(module, QuantizedSequentialMLP)


def unquantize_sequential_mlp(module: torch.nn.Module) -> None:
    """Undo :func:`quantize_sequential_mlp`."""
    module.__class__ = module.original_class
