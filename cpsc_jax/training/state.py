"""The train state of every network trained here."""
from typing import Any

from flax.training import train_state


class TrainState(train_state.TrainState):
    """A Flax TrainState that also carries the network's BatchNorm running averages."""

    batch_stats: Any = None
