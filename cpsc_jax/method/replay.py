"""A replay memory of generated images for the student phase (`config.student_data='replay'`).

The released iteration trains the student on fresh images only: every student step runs the
generator (its forward is most of a step's work on small classifiers) and the student sees
only what the generator makes now. With a replay memory, every generator step also stores its
images and their requested labels in a ring of the last `config.replay_size` images, and the
student steps draw their batches from it (uniformly, the teacher's logits computed on them
afresh): the student keeps seeing what the generator made earlier while it moves on, at the
cost of a teacher forward instead of a generator forward per student step. With
`student_data="fresh+replay"` every student step also trains on its fresh batch and stores it:
each synthetic image is then seen by the student about replay_batch * steps / replay_size more
times than once.

The memory is part of the unreplicated train state: every device holds the same copy (each
generator step gathers the global batch before writing it), and each device reads its share of
a global draw, so any number of devices gives the same result for the same global batch.
"""
from typing import Optional

import flax
import jax
import jax.numpy as jnp

@flax.struct.dataclass
class ReplayMemory:
    images: jax.Array     # [size, H, W, C], the generator's output (normalised input space)
    labels: jax.Array     # [size] int32, the labels the images were generated for
    count: jax.Array      # images written so far (the ring's write position is count % size)


def replay_batch(config) -> int:
    """Stored images each student step draws: `config.replay_batch`, or batch_size when 0 (and
    always batch_size with student_data="replay")."""
    if config.student_data == "replay":
        return config.batch_size
    return config.replay_batch or config.batch_size


def memory_size(config) -> int:
    """Images held: `config.replay_size`, or one epoch of generator output when it is 0."""
    return config.replay_size or config.epoch_itrs * config.g_steps * config.batch_size


def create(config, dtype=jnp.bfloat16) -> Optional[ReplayMemory]:
    """An empty memory for `config`, or None when the student trains on fresh images only.
    Images are stored in bfloat16 (half the memory; synthetic images need no more)."""
    if config.student_data == "fresh":
        return None
    size = memory_size(config)
    shape = (size, config.image_size, config.image_size, config.channels)
    return ReplayMemory(jnp.zeros(shape, dtype), jnp.zeros((size,), jnp.int32),
                        jnp.zeros((), jnp.int32))


def write(memory: ReplayMemory, images, labels) -> ReplayMemory:
    """Stores a global batch at the ring's write position (wrapping around its end)."""
    size, n = memory.images.shape[0], images.shape[0]
    images, labels = images.astype(memory.images.dtype), labels.astype(jnp.int32)
    if size % n == 0:   # writes never straddle the end: an in-place slice update
        slot = memory.count % size
        new_images = jax.lax.dynamic_update_slice_in_dim(memory.images, images, slot, 0)
        new_labels = jax.lax.dynamic_update_slice_in_dim(memory.labels, labels, slot, 0)
    else:
        idx = (memory.count + jnp.arange(n)) % size
        new_images, new_labels = memory.images.at[idx].set(images), memory.labels.at[idx].set(labels)
    return memory.replace(images=new_images, labels=new_labels, count=memory.count + n)


def sample(memory: ReplayMemory, rng, batch_size: int, start, local: int):
    """Rows start .. start + local of a uniform draw of `batch_size` stored images (with
    replacement, among those written so far): (images, labels)."""
    filled = jnp.maximum(jnp.minimum(memory.count, memory.images.shape[0]), 1)
    idx = jax.random.randint(rng, (batch_size,), 0, filled)
    idx = jax.lax.dynamic_slice_in_dim(idx, start, local)
    return memory.images[idx], memory.labels[idx]
