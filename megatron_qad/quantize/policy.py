"""Quantization policies: which module gets which format, as plain data (YAML-expressible).

A :class:`Policy` is an ordered list of :class:`Rule` s plus settings for the KV cache and input
scales. Every quantizable module (a linear layer of attention, an MLP, a routed or shared expert,
a Mamba mixer; see :mod:`.kinds`) starts in BF16; each rule that matches it, in order, sets its
weight and input formats, so later rules override earlier ones. Router, embeddings and output
layer are never swapped (they stay BF16).

Built-ins: :func:`transformer` (attention, MLP and expert linears in NVFP4) and :func:`hybrid`
(MLP/expert linears and Mamba mixers in NVFP4; attention, and the nearest Mamba layer before each
attention layer, in BF16). Both fake-quantize K and V to FP8 on their way into core attention, and
both put the linear layers that replace a DeciLM block's attention or MLP in NVFP4: each is a
GEMM on the normed residual stream whose output is added back to it, like an MLP's fc1 and fc2;
it computes no attention scores and gives no K or V, so the reasons that keep attention (and the
Mamba layer feeding it in hybrid models) in BF16 do not apply. A rule
``{kinds: [linear_replacement], weight: bf16}`` keeps them in BF16.
"""

from dataclasses import dataclass, fields

QUANTIZABLE_KINDS = ("attention", "mlp", "moe_expert", "shared_expert", "mamba_mixer", "linear_replacement")
"""Kinds of linear layers a rule can select (see :mod:`.kinds`)."""
BF16_KINDS = ("router", "embedding", "output_layer")
"""Kinds that always stay BF16."""

FORMATS = ("nvfp4", "nvfp4_4over6", "bf16")
KV_CACHE_FORMATS = ("fp8", "bf16")
AMAX_MODES = ("static", "dynamic")


class PolicyError(ValueError):
    """A policy that cannot be applied; the message names the setting and the fix."""


@dataclass(frozen=True)
class Rule:
    """Set the formats of the modules it matches.

    kinds: module kinds it applies to (empty: any), from ``QUANTIZABLE_KINDS``.
    modules: fnmatch globs over module names such as ``decoder.layers.3.mlp.linear_fc1`` (empty: any).
    weight: format of the matched modules' weights; input: of their inputs (None: same as weight).
    feeds_attention: only Mamba mixers that are the nearest Mamba layer before an attention layer.
    """

    weight: str
    input: str | None = None
    kinds: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    feeds_attention: bool = False

    @property
    def input_format(self) -> str:
        return self.weight if self.input is None else self.input


@dataclass(frozen=True)
class Policy:
    """Rules plus KV-cache format and how input / KV scales are found.

    input_amax: "static" uses the amax calibrated by :func:`megatron_qad.quantize.calibrate`
    (stored in the checkpoint, what inference engines use); "dynamic" recomputes it at every call.
    """

    rules: tuple[Rule, ...]
    kv_cache: str = "fp8"
    input_amax: str = "static"
    name: str = "custom"

    def __post_init__(self):
        for index, rule in enumerate(self.rules):
            where = f"quantization rule {index}"
            for fmt in (rule.weight, rule.input_format):
                if fmt not in FORMATS:
                    raise PolicyError(f"{where}: format {fmt!r} is not one of {FORMATS}")
            unknown = [kind for kind in rule.kinds if kind not in QUANTIZABLE_KINDS]
            if unknown:
                raise PolicyError(f"{where}: unknown kind(s) {unknown}; kinds are {QUANTIZABLE_KINDS} "
                                  f"(router, embedding and output_layer always stay BF16)")
            if rule.feeds_attention and tuple(rule.kinds) not in ((), ("mamba_mixer",)):
                raise PolicyError(f"{where}: feeds_attention applies to mamba_mixer modules only; "
                                  f"set kinds: [mamba_mixer]")
        if self.kv_cache not in KV_CACHE_FORMATS:
            raise PolicyError(f"quantization.kv_cache is {self.kv_cache!r}; use one of {KV_CACHE_FORMATS}")
        if self.input_amax not in AMAX_MODES:
            raise PolicyError(f"quantization.input_amax is {self.input_amax!r}; use one of {AMAX_MODES}")


def transformer(weight_format: str = "nvfp4") -> Policy:
    """Every linear layer of attention, dense MLPs, routed and shared experts, and DeciLM linear
    replacements in ``weight_format``."""
    return Policy(rules=(Rule(weight=weight_format, kinds=("attention", "mlp", "moe_expert", "shared_expert",
                                                           "linear_replacement")),),
                  name="transformer")


def hybrid(weight_format: str = "nvfp4") -> Policy:
    """For Mamba-Transformer-MoE models: MLP / expert linears and Mamba mixers in ``weight_format``;
    attention layers, and the nearest Mamba layer before each attention layer, in BF16 (DeciLM
    linear replacements, which are no attention, in ``weight_format``)."""
    return Policy(rules=(
        Rule(weight=weight_format, kinds=("mlp", "moe_expert", "shared_expert", "mamba_mixer", "linear_replacement")),
        Rule(weight="bf16", kinds=("mamba_mixer",), feeds_attention=True),
    ), name="hybrid")


BUILTIN_POLICIES = {"transformer": transformer, "hybrid": hybrid}


def policy_from_dict(settings: dict) -> Policy:
    """Build a policy from recipe data::

        policy: hybrid            # a built-in to start from (optional)
        format: nvfp4_4over6      # the built-in's NVFP4 format (optional, default nvfp4)
        rules:                    # appended after the built-in's rules, so they override them
          - {kinds: [moe_expert], weight: nvfp4_4over6}
          - {modules: ["decoder.layers.0.*"], weight: bf16}
        kv_cache: fp8
        input_amax: static
    """
    settings = dict(settings)
    base_name = settings.pop("policy", None)
    base_format = settings.pop("format", None)
    if base_name is not None and base_name not in BUILTIN_POLICIES:
        raise PolicyError(f"quantization.policy is {base_name!r}; built-ins are {sorted(BUILTIN_POLICIES)}")
    if base_format is not None and base_name is None:
        raise PolicyError("quantization.format sets the format of a built-in policy, but quantization.policy "
                          "is not set; set the policy, or give each rule its own weight format")
    base = BUILTIN_POLICIES[base_name](base_format or "nvfp4") if base_name else Policy(rules=())
    rule_keys = {f.name for f in fields(Rule)}
    rules = list(base.rules)
    for index, data in enumerate(settings.pop("rules", []) or []):
        unknown = set(data) - rule_keys
        if unknown:
            raise PolicyError(f"quantization.rules[{index}]: unknown key(s) {sorted(unknown)}; "
                              f"keys are {sorted(rule_keys)}")
        if "weight" not in data:
            raise PolicyError(f"quantization.rules[{index}] needs 'weight' (one of {FORMATS})")
        for key in ("kinds", "modules"):
            if key in data and not (isinstance(data[key], (list, tuple))
                                    and all(isinstance(item, str) for item in data[key])):
                raise PolicyError(f"quantization.rules[{index}].{key} must be a list of strings, "
                                  f"e.g. [{'moe_expert' if key == 'kinds' else 'decoder.layers.0.*'}]; "
                                  f"got {data[key]!r}")
        data = {**data, **{key: tuple(data[key]) for key in ("kinds", "modules") if key in data}}
        rules.append(Rule(**data))
    unknown = set(settings) - {"kv_cache", "input_amax"}
    if unknown:
        raise PolicyError(f"quantization: unknown key(s) {sorted(unknown)}; keys are "
                          f"['format', 'input_amax', 'kv_cache', 'policy', 'rules']")
    return Policy(rules=tuple(rules), name=base_name or "custom",
                  kv_cache=settings.get("kv_cache", base.kv_cache),
                  input_amax=settings.get("input_amax", base.input_amax))
