"""Bad input to the kernels gets a ValueError naming the argument and what was expected, before any work."""
import pytest
import torch

from fastrl.kernels import fused_linear_grpo_loss, fused_linear_logprobs, group_advantages

B, T, H, V = 4, 3, 8, 17


def good(**over):
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
              targets=torch.randint(0, V, (B, T), generator=g), mask=torch.ones(B, T), advantages=torch.randn(B))
    kw.update(over)
    return kw


def call(**over):
    kw = good(**over)
    return fused_linear_grpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), kw.pop("mask"),
                                  kw.pop("advantages"), backend="torch", **kw)


CASES = {
    "hidden-2d": ({"hidden": torch.randn(B * T, H)}, "hidden"),
    "weight-H": ({"weight": torch.randn(V, H + 1)}, "weight"),
    "targets-shape": ({"targets": torch.zeros(B, T + 1, dtype=torch.long)}, "targets"),
    "targets-float": ({"targets": torch.zeros(B, T)}, "targets"),
    "targets-high": ({"targets": torch.full((B, T), V)}, "targets"),
    "targets-negative": ({"targets": torch.full((B, T), -1)}, "targets"),
    "mask-shape": ({"mask": torch.ones(B, T + 2)}, "mask"),
    "dtype-mismatch": ({"weight": torch.randn(V, H, dtype=torch.bfloat16)}, "weight"),
    "device-mismatch": ({"weight": torch.randn(V, H, device="meta")}, "weight"),
    "bias-shape": ({"bias": torch.randn(V + 1)}, "bias"),
    "loss-type": ({"loss_type": "ppo"}, "loss_type"),
    "is-level": ({"importance_sampling_level": "chunk"}, "importance_sampling_level"),
    "dr-grpo-no-len": ({"loss_type": "dr_grpo"}, "max_completion_length"),
    "beta-no-ref": ({"beta": 0.1}, "ref_logprobs"),
    "both-adv-rewards": ({"rewards": torch.rand(B), "num_generations": 2}, "advantages/rewards"),
    "neither": ({"advantages": None}, "advantages/rewards"),
    "rewards-not-divisible": ({"advantages": None, "rewards": torch.rand(B), "num_generations": 3},
                              "num_generations"),
    "rewards-nan": ({"advantages": None, "rewards": torch.tensor([1.0, float("nan"), 0, 1]), "num_generations": 2},
                    "rewards"),
    "rewards-inf": ({"advantages": None, "rewards": torch.tensor([1.0, float("inf"), 0, 1]), "num_generations": 2},
                    "rewards"),
    "advantages-nan": ({"advantages": torch.tensor([0.0, float("nan"), 0, 1])}, "advantages"),
    "advantages-shape": ({"advantages": torch.randn(B, T)}, "advantages"),
    "old-nan": ({"old_logprobs": torch.full((B, T), float("nan"))}, "old_logprobs"),
    "ref-inf": ({"beta": 0.1, "ref_logprobs": torch.full((B, T), -float("inf"))}, "ref_logprobs"),
    "old-shape": ({"old_logprobs": torch.zeros(B, T + 1)}, "old_logprobs"),
    "is-ratio-shape": ({"is_ratio": torch.ones(B, 2)}, "is_ratio"),
    "temperature": ({"temperature": 0.0}, "temperature"),
    "scale-rewards": ({"advantages": None, "rewards": torch.rand(B), "num_generations": 2, "scale_rewards": "x"},
                      "scale_rewards"),
    "backend": ({"backend_override": "cuda"}, "backend"),
}


@pytest.mark.parametrize("over,name", CASES.values(), ids=CASES.keys())
def test_bad_input_names_the_argument(over, name):
    over = dict(over)
    if "backend_override" in over:
        kw = good()
        with pytest.raises(ValueError, match=f"^{name}"):
            fused_linear_grpo_loss(kw["hidden"], kw["weight"], kw["targets"], kw["mask"], kw["advantages"],
                                   backend=over["backend_override"])
        return
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        call(**over)


def test_logprobs_bad_input():
    h, w = torch.randn(5, 8), torch.randn(V, 8)
    with pytest.raises(ValueError, match="^targets"):
        fused_linear_logprobs(h, w, torch.full((5,), V))
    with pytest.raises(ValueError, match="^weight"):
        fused_linear_logprobs(h, w.half(), torch.zeros(5, dtype=torch.long))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="^num_generations"):
        group_advantages(torch.rand(6), 4)
    with pytest.raises(ValueError, match="^rewards"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="^scale_rewards"):
        group_advantages(torch.rand(4), 2, scale_rewards="global")
