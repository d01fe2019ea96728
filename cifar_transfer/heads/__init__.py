"""Heads by name: the one registry the configuration, the CLI and the head stage read.

An entry is what choosing a head needs, known without TensorFlow (the configuration is checked before anything
heavy loads): its name, a line for `--help`, the features it fits, and whether "auto" and "all" try it. How it
trains is the module `cifar_transfer.heads.<name>`, loaded on first use: its `TRAINER` (a `heads.base.Trainer`)
fits it, refits it and types what validation chose for it.

"auto" tries the entries marked `in_auto`, "all" those marked `in_all`, each only where it fits the features;
when more than one is tried, their ensemble is one more candidate, and the best on validation wins. Candidates are
fitted, recorded and tie-broken in the order of `HEADS`.

Adding a head: write `cifar_transfer/heads/<name>.py` with its `TRAINER`, and add its entry to `HEADS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

SELECTIONS = {"auto": "in_auto", "all": "in_all"}  # the values of --head that choose among heads, by the flag they try


@dataclass(frozen=True)
class HeadType:
    """A kind of head, as options name it."""

    name: str
    summary: str  # what it is and what validation chooses for it, for --help
    spatial_only: bool = False  # fits spatial maps only (pooling 'none'); the others fit vectors and pooled maps
    in_auto: bool = False  # 'auto' tries it: fast and rarely worse than the rest
    in_all: bool = True  # 'all' tries it

    def fits(self, feature_shape: list[int]) -> bool:
        return len(feature_shape) > 1 or not self.spatial_only

    @property
    def trainer(self) -> Any:
        """Its module's `TRAINER`, a `heads.base.Trainer` (not named here: the configuration imports this registry
        for the head names, and `heads.base` imports the configuration)."""
        return importlib.import_module(f"{__name__}.{self.name}").TRAINER


HEADS = {
    head.name: head
    for head in (
        HeadType("conv", "spatial maps: the 2017 post's Conv2D head, best epoch on validation", spatial_only=True, in_auto=True),
        HeadType("ridge", "closed form from streamed moments, strength chosen on validation"),
        HeadType(
            "softmax",
            "logistic regression: full-batch L-BFGS from ridge's solution, strength chosen on validation (ridge's own included)",
            in_auto=True,
        ),
        HeadType("logistic", "trained from the shards, best epoch on validation"),
        HeadType("mlp", "one hidden layer, trained from the shards, best epoch on validation"),
    )
}

HEAD_CHOICES = (*SELECTIONS, *HEADS)  # every value of --head


def candidate_heads(kind: str, feature_shape: list[int]) -> list[HeadType]:
    """The heads a kind fits on features of `feature_shape`: itself, or what "auto" or "all" try there."""
    if kind not in SELECTIONS:
        return [HEADS[kind]]
    return [head for head in HEADS.values() if getattr(head, SELECTIONS[kind]) and head.fits(feature_shape)]


def vector_heads() -> list[str]:
    return [head.name for head in HEADS.values() if not head.spatial_only]


def head_option_help() -> str:
    """The --head description, from the entries."""
    heads = ", ".join(f"'{head.name}' ({head.summary})" for head in HEADS.values())
    auto = " and ".join(head.name for head in HEADS.values() if head.in_auto)
    return (
        f"classifier head: {heads}; 'auto': {auto} where they fit the features, and their ensemble when more than one does; "
        "'all': every head that fits the features and their ensemble (minutes instead of seconds, a point or two more); "
        "the best on validation wins"
    )
