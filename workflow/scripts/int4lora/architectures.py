"""Architectures by transformers model_type, and what the pipeline must know per family.

Any decoder model_type that transformers knows as a causal LM can be synthesized from its config
fields (`build_config`). A small registry (`FAMILIES`) adds what names alone do not say:

- MoE config keys: Mixtral counts experts in `num_local_experts` and sizes them with
  `intermediate_size`; Qwen MoE uses `num_experts` and `moe_intermediate_size`; Qwen2-MoE adds
  a shared expert (`shared_expert_intermediate_size`) with a sigmoid gate.
- Checkpoint / vLLM expert names. transformers 5 holds experts fused
  (`<layer>.mlp.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I]; gate rows first);
  llmcompressor 0.14 linearizes them and saves `<block>.experts.<e>.{gate,up,down}_proj`.
  vLLM 0.26 loads experts through RoutedExperts.build_expert_params_mapping
  (vllm/model_executor/layers/fused_moe/routed_experts.py) with the names the model passes:
  mixtral.py MixtralMoE `ckpt_names=("w1", "w2", "w3")` under `block_sparse_moe`; qwen2_moe.py
  and qwen3_moe.py use FusedMoE's defaults gate_proj/down_proj/up_proj under `mlp`. A name it
  does not expect is skipped without a word and the expert is served uninitialised.
- Routers and the shared-expert gate are never quantized: vLLM builds mixtral and qwen2_moe
  routers and qwen2_moe's `shared_expert_gate` with `quant_config=None`; qwen3_moe's router gets
  the quant config and stays 16-bit only because the checkpoint's `ignore` list names it.
- Module families for coverage: a shared expert is a dense MLP that every token runs, so it
  counts as `dense_mlp` (and is read in full on every decode step); its gate is a `router`.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

# llmcompressor 0.14 writes linearized experts under these names (checked on tiny Mixtral,
# Qwen2-MoE and Qwen3-MoE); the roles are gate, up, down.
LINEARIZED_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# transformers 5 fused expert parameters (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts)
HF_FUSED_EXPERTS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class MoeNames:
    num_experts_key: str
    expert_intermediate_key: str
    top_k_key: str = "num_experts_per_tok"
    shared_intermediate_key: str | None = None
    ckpt_block: str = "mlp"                 # the MoE block's name in checkpoints and in vLLM
    vllm_expert_names: tuple = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    routers: tuple = ("gate",)              # modules of the block that stay 16-bit
    shared_expert: str | None = None


@dataclass(frozen=True)
class Family:
    model_type: str
    moe: MoeNames | None = None
    notes: str = ""
    registered: bool = field(default=True, compare=False)


FAMILIES = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2", notes="q/k/v projections carry a bias (kept in 16 bit)"),
    "mixtral": Family("mixtral", MoeNames("num_local_experts", "intermediate_size",
                                          ckpt_block="block_sparse_moe",
                                          vllm_expert_names=("w1", "w3", "w2"))),
    "qwen3_moe": Family("qwen3_moe", MoeNames("num_experts", "moe_intermediate_size"),
                        notes="q/k RMSNorm per head; router quantizable in vLLM unless ignored"),
    "qwen2_moe": Family("qwen2_moe", MoeNames(
        "num_experts", "moe_intermediate_size",
        shared_intermediate_key="shared_expert_intermediate_size",
        routers=("gate", "shared_expert_gate"), shared_expert="shared_expert"),
        notes="q/k/v bias; one shared expert per MoE layer with a sigmoid gate"),
}

# Module family of a tensor name, first match wins. Covers HF names (fused experts), checkpoint
# names (per-expert, block_sparse_moe) and vLLM's (w1/w2/w3) for every registered family.
MODULE_FAMILY_RULES = [
    ("lora", r"lora_[AB]|lora_embedding"),
    ("norm", r"norm\.|norm$|\.ln_"),
    ("router", r"shared_expert_gate"),
    ("dense_mlp", r"\.shared_experts?\."),
    ("experts", r"\.experts\.|block_sparse_moe\.experts|\.w[123]\.|gate_up_proj(?!\.)"),
    ("router", r"block_sparse_moe\.gate\.|mlp\.gate\.|\.router\."),
    ("attention", r"self_attn|\.attn\.|attention"),
    ("dense_mlp", r"\.mlp\."),
    ("embeddings", r"embed_tokens|wte|word_embeddings"),
    ("lm_head", r"lm_head"),
]
_COMPILED_RULES = [(fam, re.compile(pattern)) for fam, pattern in MODULE_FAMILY_RULES]


def module_family(name: str) -> str:
    for fam, pattern in _COMPILED_RULES:
        if pattern.search(name):
            return fam
    return "other"


def known_model_types() -> list[str]:
    """Every model_type transformers can build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_model_type(model_type) -> str:
    """`model_type` itself, or a ValueError naming it (and close matches)."""
    import transformers
    known = known_model_types()
    if not isinstance(model_type, str) or model_type not in known:
        close = difflib.get_close_matches(str(model_type), known, n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model_type {model_type!r}: transformers "
                         f"{transformers.__version__} has no causal LM of that type{hint}")
    return model_type


def family(model_type: str) -> Family:
    """The registered family, or a generic dense one for another known decoder model_type."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return Family(check_model_type(model_type), registered=False)


def model_type_of(spec: dict) -> str:
    """The model_type a model spec names (`model_type`, or the older alias `architecture`)."""
    names = {spec[k] for k in ("model_type", "architecture") if spec.get(k) is not None}
    if len(names) > 1:
        raise ValueError(f"model spec names two architectures: model_type={spec['model_type']!r}"
                         f" but architecture={spec['architecture']!r}")
    if not names:
        raise ValueError("model spec needs model_type (or architecture)")
    return names.pop()


def spec_is_moe(spec: dict) -> bool:
    """Whether a synthetic model spec describes a MoE (a hub/local spec: unknown, True)."""
    if not (spec.get("model_type") or spec.get("architecture")):
        return True
    moe = family(model_type_of(spec)).moe
    if moe is None:
        return False
    return (spec.get("arch") or {}).get(moe.num_experts_key, 1) > 0


def config_errors(models: dict) -> list[str]:
    """Config-time checks of every synthetic model: its model_type, and an `arch` that
    transformers builds and that the pipeline can synthesize and serve."""
    errors = []
    for name, spec in models.items():
        if spec.get("source") not in ("synthetic", "synthetic-w4a16"):
            continue
        try:
            model_type = check_model_type(model_type_of(spec))
        except ValueError as exc:
            errors.append(f"models.{name}: {exc}")
            continue
        try:
            config = build_config(model_type, spec.get("arch") or {})
        except Exception as exc:  # noqa: BLE001 (transformers raises its own validation errors)
            errors.append(f"models.{name}.arch: {_last_line(exc)}")
            continue
        errors += [f"models.{name}.arch.{problem}"
                   for problem in arch_problems(config, explicit_head_dim="head_dim" in
                                                (spec.get("arch") or {}))]
    return errors


def _last_line(exc: Exception) -> str:
    """The cause of a wrapped error (transformers prints its validator's name first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1].removeprefix("ValueError: ") if lines else type(exc).__name__


def arch_problems(config, explicit_head_dim: bool = False) -> list[str]:
    """What a built config gets wrong for synthesis and serving, each as `key=value: why`
    (transformers 5.17 checks hidden_size against the heads for llama only, none of the rest)."""
    from .models import BYTE_TOKENIZER_SIZE
    problems = []
    if config.vocab_size < BYTE_TOKENIZER_SIZE:
        problems.append(f"vocab_size={config.vocab_size}: below the byte tokenizer's "
                        f"{BYTE_TOKENIZER_SIZE} tokens that synthetic models are saved with")
    if config.num_hidden_layers < 1:
        problems.append(f"num_hidden_layers={config.num_hidden_layers}: needs at least 1")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    if heads and hidden and not explicit_head_dim and hidden % heads:
        problems.append(f"num_attention_heads={heads}: must divide hidden_size={hidden} "
                        f"(or set head_dim)")
    if heads and kv_heads and (kv_heads > heads or heads % kv_heads):
        problems.append(f"num_key_value_heads={kv_heads}: must divide "
                        f"num_attention_heads={heads} (grouped-query attention)")
    moe = family(config.model_type).moe
    if moe is not None:
        experts, top_k = getattr(config, moe.num_experts_key, 0), getattr(config, moe.top_k_key, 0)
        if experts and not 1 <= top_k <= experts:
            problems.append(f"{moe.top_k_key}={top_k}: must be between 1 and "
                            f"{moe.num_experts_key}={experts}")
    return problems


def build_config(model_type: str, arch: dict, **fixed):
    """A transformers config from config fields; a field the config class lacks is an error."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_model_type(model_type)
    defaults = CONFIG_MAPPING[model_type]()
    config = AutoConfig.for_model(model_type, **{**arch, **fixed})
    # a field the class does not know is kept verbatim as an extra attribute (a typo); legacy
    # kwargs such as rope_theta are consumed (into rope_parameters) and leave none
    unknown = sorted(k for k in arch if not hasattr(defaults, k) and hasattr(config, k))
    if unknown:
        raise ValueError(f"{model_type}: unknown config field(s) {unknown}")
    return config


def moe_layout(config) -> dict | None:
    """Expert counts and sizes of a config, and which layers are MoE layers (None: dense)."""
    moe = family(config.model_type).moe
    if moe is None or not getattr(config, moe.num_experts_key, 0):
        return None
    n_layers = config.num_hidden_layers
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    layers = [i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0]
    shared = getattr(config, moe.shared_intermediate_key, 0) if moe.shared_intermediate_key else 0
    return {"num_experts": getattr(config, moe.num_experts_key),
            "top_k": getattr(config, moe.top_k_key),
            "expert_intermediate": getattr(config, moe.expert_intermediate_key),
            "shared_intermediate": shared or 0, "moe_layers": layers}


def w4a16_ignore(model_type: str | None) -> list[str]:
    """llmcompressor `ignore` patterns: lm_head, routers and (Qwen2-MoE) the shared-expert gate."""
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*router$"]
    moe = FAMILIES.get(model_type, Family("")).moe
    for router in (moe.routers if moe else ()):
        if router != "gate":
            ignore.append(f"re:.*{router}$")
    return ignore


_LINEARIZED = re.compile(r"^(?P<layer>.*?)\.(?P<block>block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                         r"(?P<name>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<rest>.*)$")


def parse_expert_name(name: str, model_type: str) -> tuple[str, int, str, str] | None:
    """(layer prefix, expert, role gate|up|down, tensor suffix) of a per-expert tensor name in
    either llmcompressor's or vLLM's naming for this family; None for other tensors."""
    m = _LINEARIZED.match(name)
    moe = family(model_type).moe
    if not m or moe is None:
        return None
    roles = dict(zip(LINEARIZED_EXPERT_NAMES, ("gate", "up", "down")))
    roles.update(zip(moe.vllm_expert_names, ("gate", "up", "down")))
    role = roles.get(m.group("name"))
    if role is None:
        return None
    return m.group("layer"), int(m.group("e")), role, m.group("rest")


def vllm_expert_tensor(layer: str, expert: int, role: str, suffix: str, model_type: str) -> str:
    """The tensor name vLLM 0.26 loads for one expert's gate/up/down projection."""
    moe = family(model_type).moe
    name = dict(zip(("gate", "up", "down"), moe.vllm_expert_names))[role]
    return f"{layer}.{moe.ckpt_block}.experts.{expert}.{name}.{suffix}"


def to_vllm_name(name: str, model_type: str) -> str:
    """A checkpoint tensor name rewritten to what vLLM loads (experts; others unchanged)."""
    parsed = parse_expert_name(name, model_type)
    return vllm_expert_tensor(*parsed, model_type) if parsed else name


def misnamed_experts(names, model_type: str) -> list[str]:
    """Expert tensors vLLM 0.26 would skip (and so serve uninitialised) for this model_type."""
    moe = family(model_type).moe
    bad = []
    for name in names:
        if ".experts." not in name or moe is None:
            continue
        parsed = parse_expert_name(name, model_type)
        if parsed is None or vllm_expert_tensor(*parsed, model_type) != name:
            bad.append(name)
    return bad


def hf_to_checkpoint_name(hf_name: str, model_type: str) -> str:
    """A transformers 5 parameter name as the checkpoint (and vLLM) spells it (non-experts)."""
    moe = family(model_type).moe
    if moe is not None and moe.ckpt_block != "mlp":
        return hf_name.replace(".mlp.", f".{moe.ckpt_block}.")
    return hf_name


def checkpoint_to_hf_name(name: str, model_type: str) -> str:
    moe = family(model_type).moe
    if moe is not None and moe.ckpt_block != "mlp":
        return name.replace(f".{moe.ckpt_block}.", ".mlp.")
    return name


def router_modules(config) -> list[str]:
    """Checkpoint module names of every router / shared-expert gate (never quantized)."""
    layout = moe_layout(config)
    if layout is None:
        return []
    moe = family(config.model_type).moe
    return [f"model.layers.{i}.{moe.ckpt_block}.{r}" for i in layout["moe_layers"]
            for r in moe.routers]
