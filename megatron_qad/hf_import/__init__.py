"""``megatron-qad import``: a published Hugging Face checkpoint (BF16 / FP16 / FP32 safetensors) as a
megatron.core dist checkpoint that ``teacher.checkpoint`` loads, plus the recipe's ``model:``
section derived from its ``config.json`` (see :func:`import_checkpoint`).

Architectures are registry entries, one module per family, keyed by ``config.json``'s
``architectures[0]`` (else ``model_type``):

* :mod:`.llama` ``LlamaForCausalLM``; :mod:`.qwen2` ``Qwen2ForCausalLM``;
  :mod:`.qwen2_moe` ``Qwen2MoeForCausalLM``; :mod:`.nemotron_h` ``NemotronHForCausalLM``;
  :mod:`.decilm` ``DeciLMForCausalLM`` (Llama-Nemotron-Super's per-block layers).

Adding an architecture is one module that registers a :class:`~.family.Family`::

    from .family import Family, register

    def my_fields(config):            # config: HFConfig; return ModelConfig field -> value,
        ...                           # raise config.refuse(field, value, why) for what megatron
                                      # cannot reproduce
    register(Family(name="mine", architectures=("MyForCausalLM",), model_types=("mine",),
                    model_fields=my_fields))

and an import of it below. Tensors are found through ``tensor_sources`` (default: the export's
name table read backwards, :func:`megatron_qad.export.hf_names.hf_sources`); a family whose HF
names differ passes its own function of the same signature.
"""

from . import decilm, llama, nemotron_h, qwen2, qwen2_moe  # noqa: F401  (each registers its family)
from .convert import ImportResult, import_checkpoint
from .family import FAMILIES, Family, HFConfig, family_for, register

__all__ = ["FAMILIES", "Family", "HFConfig", "ImportResult", "family_for", "import_checkpoint", "register"]
