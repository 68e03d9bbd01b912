"""The interface between the pipeline's stage recovery and a rule that rebuilds a lost stage.

The pipeline runtime (``peer.train.pipeline`` with ``recovery.stage``) restores a stage in this order:
(1) copy a surviving replica, exactly; (2) when no replica survives, ask a ``StageRebuild`` for weights
computed from the neighbouring stages (CheckFree / CheckFree+: ``recovery.checkfree``); (3) with neither,
stop with ``StageLost`` naming the stage. Weights travel as plain named float arrays (no object serialisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from collectives.errors import SwarmError


@dataclass
class NeighbourState:
    """What a neighbouring stage contributes to a rebuild: its weights and its last gradient norm.

    ``weights``: parameter name (within its stage module) -> array, as ``state_dict`` order gives them.
    ``grad_norm``: the stage's most recent gradient L2 norm, measured before clipping (``None``: unknown).
    ``grad_norm_clipped``: the same norm after clipping to the pipeline's max-norm (``None``: unknown).
    ``rebuilt``: the stage was itself rebuilt since its last committed step (its norm is not valid).
    ``swap_partner``: under CheckFree+ this stage is the swap partner of the lost one (identical shapes,
    trained in the lost stage's position on every other micro-batch)."""
    stage: int
    weights: dict[str, np.ndarray]
    grad_norm: Optional[float] = None
    grad_norm_clipped: Optional[float] = None
    rebuilt: bool = False
    swap_partner: bool = False
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. a copied (de)embedding


@dataclass
class RebuildResult:
    """The rebuilt stage's weights, how they were made, and what the optimizer should do."""
    weights: dict[str, np.ndarray]
    how: str                      # e.g. "checkfree", "checkfree-uniform", "swap-copy", "copy-nearest"
    degraded: bool = False        # a fallback that no paper's rule covers (e.g. two adjacent stages lost)
    lr_scale: float = 1.0         # multiply the rebuilt stage's learning rate by this
    fresh_optimizer: bool = True  # the rebuilt stage starts with a fresh optimizer state
    note: str = ""


class RebuildRefused(SwarmError):
    """The rule cannot rebuild this stage (e.g. neighbour shapes differ from the lost stage's)."""


class StageLost(SwarmError):
    """A stage lost every replica and no rebuild rule could restore it: training cannot go on."""

    def __init__(self, stage: int, why: str) -> None:
        super().__init__(f"stage {stage} lost every replica and cannot be rebuilt: {why}")
        self.stage = stage
        self.why = why


class StageRebuild(Protocol):
    """A rule that rebuilds a lost stage from its neighbours. Pure: no I/O, same inputs -> same bits."""

    def rebuild(self, stage: int, num_stages: int, shapes: dict[str, tuple[int, ...]],
                neighbours: dict[int, NeighbourState]) -> RebuildResult:
        """``shapes``: the lost stage's parameter shapes (name -> shape); ``neighbours``: the surviving
        stages the runtime could fetch (at least the adjacent ones that survive). Raises ``RebuildRefused``."""
        ...
