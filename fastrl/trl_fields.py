"""Every field of TRL's GRPOConfig and what fastrl does with it, read from the code: GRPOConfig's UNSUPPORTED
(refused by name when changed) and NO_EFFECT (accepted, no effect) tables; every other field is honoured.

    python -m fastrl.trl_fields      # prints README.md's field list (tests/test_trl_fields.py keeps them equal)

Needs the installed TRL (its GRPOConfig's field list is the one being described).
"""
from __future__ import annotations

import dataclasses

from fastrl.config import NO_EFFECT, UNSUPPORTED, GRPOConfig

START, END = "<!-- trl-fields:start -->", "<!-- trl-fields:end -->"


def classify() -> dict[str, list[str]]:
    """TRL GRPOConfig field names by what fastrl does with them, plus fastrl's own fields."""
    import trl

    theirs = [f.name for f in dataclasses.fields(trl.GRPOConfig)]
    ours = GRPOConfig.field_names()
    return {"honoured": sorted(n for n in theirs if n in ours and n not in UNSUPPORTED and n not in NO_EFFECT),
            "no_effect": sorted(n for n in theirs if n in NO_EFFECT),
            "refused": sorted(n for n in theirs if n in UNSUPPORTED),
            "missing": sorted(n for n in theirs if n not in ours),
            "fastrl_only": sorted(ours - set(theirs))}


def markdown() -> str:
    """The README block: honoured fields, fields with no effect, fields refused when changed (with why)."""
    groups = classify()

    def names(items):
        return ", ".join(f"`{n}`" for n in items)

    refused = "; ".join(f"`{n}` ({UNSUPPORTED[n][1]})" for n in groups["refused"])
    lines = [START, "",
             f"**Honoured** ({len(groups['honoured'])}): {names(groups['honoured'])}.", "",
             f"**Accepted, no effect here** ({len(groups['no_effect'])}; why: `fastrl.config.NO_EFFECT`): "
             f"{names(groups['no_effect'])}.", "",
             f"**Refused with a ValueError naming the field when set away from TRL's default** "
             f"({len(groups['refused'])}): {refused}.", "",
             f"**fastrl's own** ({len(groups['fastrl_only'])}): {names(groups['fastrl_only'])}."]
    if groups["missing"]:
        lines += ["", f"**Not accepted (TypeError)** ({len(groups['missing'])}): {names(groups['missing'])}."]
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    print(markdown())
