"""README.md's "Switching from TRL" field list is `python -m fastrl.trl_fields`'s output, and every field of the
installed TRL's GRPOConfig and every GRPOTrainer argument is accepted (honoured, no effect, or refused by name), none
with a TypeError."""
import os

import pytest

pytest.importorskip("trl")

from fastrl.config import GRPOConfig, NO_EFFECT, UNSUPPORTED  # noqa: E402
from fastrl.trl_fields import END, START, classify, classify_arguments, markdown  # noqa: E402


def test_every_trl_field_is_accepted():
    groups = classify()
    assert groups["missing"] == [] and classify_arguments()["missing"] == []
    assert not set(NO_EFFECT) & set(UNSUPPORTED)
    assert set(NO_EFFECT) <= GRPOConfig.field_names()


def test_readme_lists_the_fields_as_the_code_does():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme[readme.index(START):readme.index(END) + len(END)]
    assert block == markdown(), "README.md is stale: paste `python -m fastrl.trl_fields` between the markers"
