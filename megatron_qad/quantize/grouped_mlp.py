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
the same order: outputs and gradients equal the per-expert path's bit for bit.

The experts run one by one, each quantizing for itself, where the grouped forward does not apply:
while calibrating (each expert observes its own amax), one local expert, Transformer Engine's own
FP8 / FP4 training (token padding), ``moe_apply_probs_on_input``, biases, a Transformer Engine
activation module, a fused activation other than SwiGLU, or quantizers that cannot run as one
group (``grouped.can_group``).
"""

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from . import grouped
from .layers import QuantizedLinear, _quantized_class, given_operands
from .quantizer import TensorQuantizer

_ROLES = (("linear_fc1", "input_quantizer"), ("linear_fc1", "weight_quantizer"),
          ("linear_fc2", "input_quantizer"), ("linear_fc2", "weight_quantizer"))


def _activation(config, activation_func, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``MLP.forward`` between its two linear layers for an expert without bias and without a
    Transformer Engine activation module: x [tokens, fc1 width of this rank] (the fc1 output),
    probs [tokens] (the router's, usually fp32) as ``per_token_scale``. Returns [tokens, fc2 input
    width of this rank] in x's dtype."""
    scale = probs.unsqueeze(-1)
    if config.bias_activation_fusion:  # SwiGLU only (see QuantizedSequentialMLP._grouped_roles)
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


class QuantizedSequentialMLP:
    """Mixin put in front of ``SequentialMLP`` (see :func:`quantize_sequential_mlp`): the grouped
    forward of the module docstring, or ``SequentialMLP``'s own where it does not apply."""

    def _grouped_roles(self) -> list[list[TensorQuantizer] | None] | None:
        """The experts' quantizers of each role (fc1 input, fc1 weight, fc2 input, fc2 weight) as a
        list per role, None for a role every expert keeps in BF16; None when the experts must run
        one by one."""
        config = self.config
        fused_swiglu = config.gated_linear_unit and config.activation_func is F.silu
        if (self.num_local_experts == 1 or config.fp8 or config.fp4 or config.moe_apply_probs_on_input
                or config.add_bias_linear or config.use_te_activation_func
                or (config.bias_activation_fusion and not fused_swiglu)):
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
        if roles is None:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        fc1_inputs, fc1_weights, fc2_inputs, fc2_weights = roles
        experts = list(self.local_experts)
        m_splits = tokens_per_expert.tolist()

        def quantized_weights(quantizers, linear_name):
            weights = [getattr(expert, linear_name).weight for expert in experts]
            return weights if quantizers is None else grouped.fake_quantize_weights(quantizers, weights)

        x = permuted_local_hidden_states
        if fc1_inputs is not None:
            x = grouped.fake_quantize_tokens(fc1_inputs, x, m_splits)
        intermediates = []
        for expert, tokens, probs, weight in zip(experts, torch.split(x, m_splits),
                                                 torch.split(permuted_probs, m_splits),
                                                 quantized_weights(fc1_weights, "linear_fc1")):
            with given_operands(expert.linear_fc1, weight):
                intermediate, _ = expert.linear_fc1(tokens)
            intermediates.append(_activation(self.config, expert.activation_func, intermediate, probs))
        h = torch.cat(intermediates)
        if fc2_inputs is not None:
            h = grouped.fake_quantize_tokens(fc2_inputs, h, m_splits)
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
