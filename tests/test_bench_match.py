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
