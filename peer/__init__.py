"""swarmtrain peer: membership, the coordinator role, the Python API and the CLI."""

from peer.config import PeerConfig, Timeouts
from peer.swarm import Communicator, Swarm, with_retry

__all__ = ["Communicator", "PeerConfig", "Swarm", "Timeouts", "with_retry"]
