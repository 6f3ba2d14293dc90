"""LossSpec, the one home of the loss rules: built from GRPOConfig, it gives each micro-batch's loss TRL's
normalisation (trl/trainer/grpo_trainer.py, _compute_loss, TRL 1.16), checked here against TRL's lines restated
on the float64 reference, for every loss type, accumulation, steps_per_generation and world size."""
import pytest
import torch

from fastrl import GRPOConfig
from fastrl.kernels import fused_linear_grpo_loss
from fastrl.kernels.loss_spec import LOSS_TYPES, LossSpec
from fastrl.kernels.reference import reference_grpo_loss
from kernel_cases import make_linear_inputs


def micro_batch(seed, B=6, T=9, H=16, V=40):
    h, w, y, _ = make_linear_inputs(0, H, V, torch.float64, seed, lead=(B, T))
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    return h, w, y, mask, torch.randn(B, generator=g, dtype=torch.float64)


def trl_loss(h, w, y, mask, adv, loss_type, gen_tokens, accum, spg, world, max_len):
    """TRL's reduction and scaling per loss type, restated: per-micro-batch mean / accumulation steps, or dapo's
    generation-batch token count / processes × accumulation steps / steps_per_generation."""
    if loss_type in ("grpo", "sapo"):
        return reference_grpo_loss(h, w, y, mask, adv, loss_type=loss_type)[0] / accum
    objective = loss_type if loss_type in ("cispo", "vespo") else "dapo"  # Σ m·L: token-sum types, divisor 1
    total = reference_grpo_loss(h, w, y, mask, adv, loss_type=objective, num_items_in_batch=1.0)[0]
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1) / accum
    if loss_type == "dr_grpo":
        return total / (mask.shape[0] * max_len) / accum
    if loss_type == "luspo":
        return total / mask.shape[0] / accum
    return total / (max(1.0, gen_tokens) / world * accum / spg)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("accum, spg, world", [(1, 1, 1), (2, 4, 1), (4, 2, 2)])
def test_micro_batch_loss_is_trls(loss_type, accum, spg, world):
    seed = 7 * accum + spg + LOSS_TYPES.index(loss_type)
    h, w, y, mask, adv = micro_batch(seed)
    args = GRPOConfig(loss_type=loss_type, gradient_accumulation_steps=accum, steps_per_generation=spg,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=12, beta=0.0)
    spec = LossSpec.from_config(args, world_size=world)
    gen_tokens = float(mask.sum()) * spg * 1.5  # the generation batch holds more tokens than this micro-batch
    ours = reference_grpo_loss(h, w, y, mask, adv, **spec.loss_kwargs(gen_tokens))[0] * spec.micro_batch_scale
    expected = trl_loss(h, w, y, mask, adv, loss_type, gen_tokens, accum, spg, world, 12)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    fused = fused_linear_grpo_loss(h.float(), w.float(), y, mask.float(), adv.float(), backend="torch",
                                   **spec.loss_kwargs(gen_tokens))[0] * spec.micro_batch_scale
    torch.testing.assert_close(fused.double(), expected, rtol=2e-5, atol=1e-7)  # fp32 path


def test_spec_takes_the_config_and_world_size():
    args = GRPOConfig(loss_type="bnpo", beta=0.04, epsilon=0.3, epsilon_high=0.5, delta=2.0, temperature=0.7,
                      importance_sampling_level="sequence", top_entropy_quantile=0.5, max_completion_length=64)
    spec = LossSpec.from_config(args)
    kwargs = spec.loss_kwargs(100.0)
    assert kwargs == dict(loss_type="bnpo", beta=0.04, epsilon=0.3, epsilon_high=0.5, delta=2.0, temperature=0.7,
                          importance_sampling_level="sequence", use_bias_correction_kl=args.use_bias_correction_kl,
                          top_entropy_quantile=0.5, max_completion_length=64, num_items_in_batch=None,
                          off_policy_mask_threshold=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                          vespo_lambda_neg=2.0, entropy_coef=None)
    assert spec.world_size == args.world_size == 1
    assert LossSpec.from_config(args, world_size=4).world_size == 4
    dapo = LossSpec.from_config(GRPOConfig(loss_type="dapo"), world_size=4)
    assert dapo.num_items_in_batch(0.0) == 0.25  # clamped at 1 before the per-process share, as TRL does
    assert dapo.micro_batch_scale == 1.0


def test_loss_types_have_one_home():
    import fastrl.config
    import fastrl.kernels.checks

    assert fastrl.config.LOSS_TYPES is LOSS_TYPES is fastrl.kernels.checks.LOSS_TYPES
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_entropy_bonus_is_scaled_for_accumulation_only(loss_type):
    """TRL: the bonus is coef × the micro-batch's token-mean entropy / gradient_accumulation_steps for every loss
    type; the kernel's coefficient is chosen so that its loss times the micro-batch scale carries exactly that."""
    h, w, y, mask, adv = micro_batch(31)
    spec = LossSpec.from_config(GRPOConfig(loss_type=loss_type, gradient_accumulation_steps=4), world_size=1)
    kwargs = spec.loss_kwargs(100.0)
    with_bonus = spec.loss_kwargs(100.0, 0.2, spec.micro_batch_scale, spec.micro_batch_entropy_scale)
    plain, metrics = reference_grpo_loss(h, w, y, mask, adv, **kwargs)
    bonus, _ = reference_grpo_loss(h, w, y, mask, adv, **with_bonus)
    delta = (plain - bonus) * spec.micro_batch_scale
    torch.testing.assert_close(delta, 0.2 * metrics["entropy"] / 4, rtol=1e-12, atol=0)
