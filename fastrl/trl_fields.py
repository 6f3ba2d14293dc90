"""Every field of TRL's GRPOConfig and what fastrl does with it, read from the code: GRPOConfig's UNSUPPORTED
(refused by name when changed) and NO_EFFECT (accepted, no effect) tables; every other field is honoured. The same
for GRPOTrainer's arguments (fastrl.trainer.UNSUPPORTED_ARGUMENTS).

    python -m fastrl.trl_fields      # prints README.md's field list (tests/test_trl_fields.py keeps them equal)

Needs the installed TRL (its GRPOConfig's field list is the one being described).
"""
from __future__ import annotations

import dataclasses
import inspect

from fastrl.config import NO_EFFECT, UNSUPPORTED, GRPOConfig
from fastrl.trainer import UNSUPPORTED_ARGUMENTS, GRPOTrainer

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


def classify_arguments() -> dict[str, list[str]]:
    """TRL GRPOTrainer's constructor arguments by what fastrl's GRPOTrainer does with them."""
    import trl

    names = lambda cls: list(inspect.signature(cls.__init__).parameters)[1:]  # noqa: E731  (without self)
    theirs, ours = names(trl.GRPOTrainer), set(names(GRPOTrainer))
    return {"honoured": [n for n in theirs if n in ours and n not in UNSUPPORTED_ARGUMENTS],
            "refused": [n for n in theirs if n in UNSUPPORTED_ARGUMENTS],
            "missing": [n for n in theirs if n not in ours]}


def markdown() -> str:
    """The README block: honoured fields, fields with no effect, fields refused when changed (with why)."""
    groups = classify()

    def names(items):
        return ", ".join(f"`{n}`" for n in items)

    refused = "; ".join(f"`{n}` ({UNSUPPORTED[n][1]})" for n in groups["refused"])
    arguments = classify_arguments()
    refused_arguments = "; ".join(f"`{n}` ({UNSUPPORTED_ARGUMENTS[n]})" for n in arguments["refused"])
    lines = [START, "",
             f"**Honoured** ({len(groups['honoured'])}): {names(groups['honoured'])}.", "",
             f"**Accepted, no effect here** ({len(groups['no_effect'])}; why: `fastrl.config.NO_EFFECT`): "
             f"{names(groups['no_effect'])}.", "",
             f"**Refused with a ValueError naming the field when set away from TRL's default** "
             f"({len(groups['refused'])}): {refused}.", "",
             f"**fastrl's own** ({len(groups['fastrl_only'])}): {names(groups['fastrl_only'])}."]
    if groups["missing"]:
        lines += ["", f"**Not accepted (TypeError)** ({len(groups['missing'])}): {names(groups['missing'])}."]
    lines += ["", f"**GRPOTrainer arguments honoured** ({len(arguments['honoured'])}): {names(arguments['honoured'])}"
              + (f"; refused with a ValueError naming the argument: {refused_arguments}" if refused_arguments else "")
              + "."]
    if arguments["missing"]:
        lines += ["", f"**GRPOTrainer arguments not accepted (TypeError)**: {names(arguments['missing'])}."]
    return "\n".join(lines + ["", END])


if __name__ == "__main__":
    print(markdown())
