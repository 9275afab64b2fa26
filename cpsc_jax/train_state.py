"""Train states and optimizers of the student and the generator."""
from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """A Flax TrainState that also carries the network's BatchNorm running averages."""

    batch_stats: Any = None


def student_schedule(config, steps_per_iteration: int):
    """Linear warm-up over `warmup_epochs`, then cosine annealing to 0 over the rest of the run."""
    steps_per_epoch = config.epoch_itrs * steps_per_iteration
    total = config.epochs * steps_per_epoch
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)
    if warmup <= 0:
        return optax.cosine_decay_schedule(config.lr_student, total)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr_student, warmup, total, 0.0)


def student_optimizer(config, steps_per_iteration: int):
    """SGD with momentum; weight decay added to the gradient before momentum, as PyTorch does."""
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(student_schedule(config, steps_per_iteration),
                                 momentum=config.momentum))


def generator_optimizer(config):
    """Adam(b1, b2). With `generator_optimizer='reset'` (the released behaviour) the step function
    re-initialises its state before every step and the rate stays constant; 'persistent' keeps
    the moments and follows `generator_schedule`."""
    lr = config.lr_generator
    if config.generator_optimizer == "persistent" and config.generator_schedule == "cosine":
        lr = optax.cosine_decay_schedule(lr, config.epochs * config.epoch_itrs * config.g_steps)
    return optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
