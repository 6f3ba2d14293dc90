"""`fastrl bench --match`: selecting kernel cases by their id."""
import pytest

from fastrl.bench.cases import suite_cases
from fastrl.bench.cli import matching_cases


def test_match_keeps_cases_containing_any_string_and_refuses_none():
    cases = suite_cases(quick=False)
    kept = matching_cases(cases, "grpo_loss-full-bf16,logprobs-forward-fp32")
    assert kept and all("grpo_loss-full-bf16" in c.case_id or "logprobs-forward-fp32" in c.case_id for c in kept)
    assert len(kept) == sum(("grpo_loss-full-bf16" in c.case_id or "logprobs-forward-fp32" in c.case_id)
                            for c in cases)
    assert matching_cases(cases, None) == cases
    with pytest.raises(ValueError, match="--match"):
        matching_cases(cases, "no-such-case")


def test_only_quick_runs_skip_compiled_liger_outside_the_headline():
    """Settings.quick was once shadowed by a static method of the same name (always truthy), so full runs
    skipped compiled Liger on every sweep."""
    from fastrl.bench.kernels import Settings
    from fastrl.bench.providers import PROVIDERS

    case = next(c for c in suite_cases(quick=False) if c.sweep == "vocab" and c.operation == "grpo_loss")
    liger = PROVIDERS["liger-compiled"]
    assert Settings(device="cpu").quick is False and Settings.for_quick_run().quick is True
    assert "quick run" in (Settings.for_quick_run().skip_reason(liger, case) or "")
    assert "quick run" not in (Settings(device="cpu").skip_reason(liger, case) or "")
