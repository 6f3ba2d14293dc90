"""GRPOConfig against TRL's: same names, same defaults, same derived batch sizes, and clear errors.

TRL's own `trl.GRPOConfig` is the independent reference: every field both classes have must hold the same value
after construction, for the defaults and for a few non-default settings.
"""
import dataclasses
import math
import os
import re
import warnings

import pytest

from fastrl.config import NO_EFFECT, UNSUPPORTED, GRPOConfig

trl = pytest.importorskip("trl")

# Fields fastrl has and TRL 1.16 does not: transformers-4 names still accepted, and vLLM options of fastrl's own.
FASTRL_ONLY = {"overwrite_output_dir", "logging_dir", "warmup_ratio", "max_prompt_length", "vllm_sleep_level",
               "vllm_max_model_len", "dynamic_sampling", "dynamic_sampling_max_attempts", "ref_model_offload",
               "gradient_checkpointing_offload",
               # packed batches: padding_free is TRL's name (its SFT/DPO configs; not in TRL 1.16's GRPOConfig),
               # the token budget has fastrl's name and veRL's two
               "padding_free", "max_tokens_per_micro_batch", "use_dynamic_bsz", "ppo_max_token_len_per_gpu"}


def both(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trl.GRPOConfig(output_dir="/tmp/fastrl-cfg", report_to="none", use_cpu=True, **kwargs)
    return GRPOConfig(output_dir="/tmp/fastrl-cfg", use_cpu=True, **kwargs), theirs


def shared_differences(ours, theirs) -> dict:
    # accelerator_config: TRL turns it into an accelerate object; fastrl keeps what was given (it has no effect)
    return {f.name: (getattr(ours, f.name), getattr(theirs, f.name)) for f in dataclasses.fields(ours)
            if f.name not in FASTRL_ONLY | {"accelerator_config"} and getattr(ours, f.name) != getattr(theirs, f.name)}


def test_every_field_is_trl_or_declared_fastrl_only():
    theirs = both()[1]
    missing = [f.name for f in dataclasses.fields(GRPOConfig) if not hasattr(theirs, f.name)]
    assert set(missing) == FASTRL_ONLY


def test_defaults_equal_trl():
    ours, theirs = both()
    assert shared_differences(ours, theirs) == {}
    # the values issue 3 names explicitly, spelled out so a reader sees them
    assert (ours.learning_rate, ours.num_generations, ours.max_completion_length, ours.loss_type, ours.beta,
            ours.epsilon, ours.logging_steps, ours.gradient_checkpointing, ours.bf16) == \
        (1e-6, 8, 512, "dapo", 0.0, 0.2, 10, True, True)


@pytest.mark.parametrize("kwargs", [
    dict(per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4),
    dict(per_device_train_batch_size=4, generation_batch_size=16, num_generations=8),
    dict(per_device_train_batch_size=6, steps_per_generation=2, num_generations=3, fp16=False, bf16=False),
    dict(scale_rewards=False, epsilon_high=0.28, loss_type="grpo", beta=0.04),
], ids=["grad-accum", "gen-batch", "steps-per-gen", "misc"])
def test_derived_values_equal_trl(kwargs):
    ours, theirs = both(**kwargs)
    assert shared_differences(ours, theirs) == {}


@pytest.mark.parametrize("kwargs, names", [
    (dict(num_generations=1), "num_generations"),
    (dict(per_device_train_batch_size=6, num_generations=4), "num_generations"),  # 6 not divisible by 4
    (dict(per_device_train_batch_size=4, generation_batch_size=6), "generation_batch_size"),
    (dict(generation_batch_size=8, steps_per_generation=2), "generation_batch_size"),
], ids=["G<2", "G-not-dividing", "gen-batch-not-dividing", "both-set"])
def test_invalid_batch_settings_fail_like_trl(kwargs, names):
    with pytest.raises(ValueError, match=names):
        GRPOConfig(**kwargs)
    with warnings.catch_warnings(), pytest.raises(ValueError):
        warnings.simplefilter("ignore")
        trl.GRPOConfig(output_dir="/tmp/fastrl-cfg", report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize("value", [0, -3])
def test_max_completion_length_must_be_positive(value):
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOConfig(max_completion_length=value)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_math_fields_are_refused_by_name(name):
    default = UNSUPPORTED[name][0]
    changed = {bool: True, float: 0.5, str: "other", type(None): 0.5, int: 7}[type(default)]
    if name == "eval_strategy":
        changed = "steps"
    with pytest.raises(ValueError, match=rf"^{name}="):
        GRPOConfig(**{name: changed})


def test_harmless_fields_are_accepted():
    cfg = GRPOConfig(logging_dir="/tmp/logs", hub_model_id="me/model", log_completions=True, run_name="r",
                     save_total_limit=2, overwrite_output_dir=True, vllm_gpu_memory_utilization=0.5)
    assert cfg.hub_model_id == "me/model"


# ---------------------------------------------------------------- no field accepted and ignored
def test_an_unknown_field_is_a_value_error_with_a_hint():
    with pytest.raises(ValueError, match="learnin_rate: not a GRPOConfig field.*'learning_rate'"):
        GRPOConfig(learnin_rate=1e-3)


def _source_without_config() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = []
    for folder in ("fastrl", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            texts += [open(os.path.join(dirpath, f)).read() for f in files
                      if f.endswith(".py") and os.path.join(dirpath, f) != os.path.join(root, "fastrl", "config.py")]
    return "\n".join(texts)


def test_every_honoured_field_is_read_by_the_code():
    """An honoured field nobody reads is accepted and ignored: each must be named outside config.py (the trainer,
    generators, policy, logger, ...), or be used by GRPOConfig's own logic by name (`self.<field>` or the quoted
    name: an alias copied into another field, a value checked against the launcher), or be listed in NO_EFFECT
    with the reason it changes nothing."""
    source = _source_without_config()
    config_py = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastrl",
                                  "config.py")).read()
    ignored = [n for n in sorted(GRPOConfig.field_names() - set(UNSUPPORTED) - set(NO_EFFECT))
               if not re.search(rf"\b{n}\b", source) and not re.search(rf"self\.{n}\b|[\"']{n}[\"']", config_py)]
    assert ignored == [], f"accepted but never read: {ignored}"


@pytest.mark.parametrize("name, value, expected", [
    ("learning_rate", math.inf, "finite"), ("beta", math.inf, "finite"), ("max_grad_norm", math.nan, "finite"),
    ("epsilon", -math.inf, "finite"), ("temperature", math.nan, "finite"), ("max_steps", 2.5, "an integer"),
    ("per_device_train_batch_size", 7.5, "an integer"), ("num_generations", True, "a number"),
    ("bf16", "false", "true or false"), ("max_grad_norm", -1.0, ">= 0"), ("logging_strategy", "epoch", "'no'"),
    ("log_level", "loud", "one of"),
], ids=lambda v: str(v))
def test_non_finite_non_integer_and_mistyped_values_name_the_field(name, value, expected):
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(expected)}"):
        GRPOConfig(**{name: value})


def test_an_integral_float_is_taken_as_the_integer():
    cfg = GRPOConfig(per_device_train_batch_size=8.0, max_steps=3.0)
    assert (cfg.per_device_train_batch_size, cfg.max_steps) == (8, 3)
    assert type(cfg.per_device_train_batch_size) is int and type(cfg.max_steps) is int


@pytest.mark.parametrize("name, value", [("loss_type", "ppo"), ("scale_rewards", "rank"), ("temperature", 0.0),
                                         ("top_p", 0.0), ("importance_sampling_level", "word"),
                                         ("optim", "sgd"), ("learning_rate", "fast")])
def test_bad_values_name_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        GRPOConfig(**{name: value})


def test_numeric_strings_from_yaml_become_numbers():
    cfg = GRPOConfig(learning_rate="1e-3", max_steps="5", epsilon_high="0.28")
    assert (cfg.learning_rate, cfg.max_steps, cfg.epsilon_high) == (1e-3, 5, 0.28)
    assert isinstance(cfg.max_steps, int)


def test_vllm_names_and_aliases():
    cfg = GRPOConfig(vllm_max_model_len=256, vllm_importance_sampling_cap=2.0)
    assert (cfg.vllm_max_model_length, cfg.vllm_max_model_len) == (256, 256)
    assert cfg.vllm_importance_sampling_clip_max == 2.0
    d = GRPOConfig()
    assert (d.vllm_sleep_level, d.vllm_importance_sampling_correction, d.vllm_importance_sampling_mode) == \
        (1, True, "sequence_mask")


def test_warmup_ratio_and_fractional_warmup_steps():
    assert GRPOConfig(warmup_ratio=0.1).warmup_steps_for(100) == 10
    assert GRPOConfig(warmup_steps=0.25).warmup_steps_for(10) == 3  # ceil, as transformers does
    assert GRPOConfig(warmup_steps=4).warmup_steps_for(10) == 4


def test_token_budget_fields():
    assert GRPOConfig(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=4096).max_tokens_per_micro_batch == 4096
    for kwargs, name in [(dict(use_dynamic_bsz=True), "ppo_max_token_len_per_gpu"),
                         (dict(max_tokens_per_micro_batch=0), "max_tokens_per_micro_batch"),
                         (dict(max_tokens_per_micro_batch=512, padding_free=False), "max_tokens_per_micro_batch"),
                         (dict(max_tokens_per_micro_batch=512, gradient_accumulation_steps=2,
                               steps_per_generation=3, per_device_train_batch_size=4, num_generations=4),
                          "steps_per_generation")]:
        with pytest.raises(ValueError, match=name):
            GRPOConfig(**kwargs)


def test_vespo_needs_per_token_vllm_ratios_as_in_trl():
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode.*vespo"):
        GRPOConfig(loss_type="vespo", use_vllm=True)  # TRL's default mode, sequence_mask
    assert GRPOConfig(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_mask").use_vllm
    assert GRPOConfig(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=False).use_vllm
