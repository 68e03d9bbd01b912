"""Kept for old imports: DiLoCo lives in ``peer.train.diloco``."""

from peer.train.diloco import DiLoCo, DiLoCoConfig, RoundRecord  # noqa: F401
from peer.train.outer import flatten_params, fragment_bounds, load_params, outer_sgd, state_digest, weight_scale  # noqa: F401
