"""The optimizers and learning-rate schedules of the student, the generator and the adapter."""
import jax.numpy as jnp
import optax


def student_schedule(config, steps_per_iteration: int):
    """The student's learning rate as a function of its step count.

    'per_epoch' (released: the schedulers step once per epoch): with W warm-up epochs and E
    epochs, epoch e = 1..W runs at lr*e/W, epoch e > W at lr*(1 + cos(pi*(e - W)/E))/2
    (CosineAnnealingLR with T_max = E, so the last epoch is not 0).
    'per_step': linear warm-up from 0 over W epochs, then cosine to 0 over the rest, per step.
    """
    lr, warm, epochs = config.lr_student, config.warmup_epochs, config.epochs
    steps_per_epoch = config.epoch_itrs * steps_per_iteration
    # (1 + cos(pi t)) / 2 is written sin(pi (1 - t) / 2)^2 with 1 - t from integers: no
    # cancellation near the end in float32. Float maths in the default float dtype (float64 in
    # the x64 parity tests; optax's own schedules are float32 there).
    as_float = lambda n: jnp.asarray(n).astype(jnp.result_type(float))
    if config.student_schedule == "per_epoch":
        def schedule(count):
            epoch = jnp.asarray(count) // steps_per_epoch + 1   # 1-based
            cosine = lr * jnp.square(jnp.sin(jnp.pi / 2 * as_float(epochs + warm - epoch) / epochs))
            return jnp.where(epoch <= warm, lr * as_float(epoch) / max(warm, 1), cosine)
        return schedule
    if config.student_schedule != "per_step":
        raise ValueError(f"student_schedule must be 'per_epoch' or 'per_step', got "
                         f"{config.student_schedule!r}")
    total = epochs * steps_per_epoch
    warmup = min(warm * steps_per_epoch, total - 1)

    def schedule(count):
        count = jnp.asarray(count)
        left = total - warmup - jnp.minimum(count - warmup, total - warmup)   # cosine steps to go
        cosine = lr * jnp.square(jnp.sin(jnp.pi / 2 * as_float(left) / (total - warmup)))
        return jnp.where(count < warmup, lr * as_float(count) / max(warmup, 1), cosine)
    return schedule


def student_optimizer(config, steps_per_iteration: int):
    """SGD with momentum; weight decay added to the gradient before momentum, as PyTorch does.
    With `student_grad_clip` > 0 the loss gradient is first clipped to that global norm (one
    outsized step can kill every ReLU of a small student; docs/RESULTS.md)."""
    clip = [optax.clip_by_global_norm(config.student_grad_clip)] if config.student_grad_clip else []
    return optax.chain(*clip, optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(student_schedule(config, steps_per_iteration),
                                 momentum=config.momentum))


def generator_schedule(config):
    """The generator's learning rate as a function of its step count: constant, or cosine to 0
    over the run with `generator_optimizer='persistent'` and `generator_schedule='cosine'`."""
    if config.generator_optimizer == "persistent" and config.generator_schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr_generator,
                                           config.epochs * config.epoch_itrs * config.g_steps)
    return optax.constant_schedule(config.lr_generator)


def generator_optimizer(config):
    """Adam(b1, b2). With `generator_optimizer='reset'` (the released behaviour) the step function
    re-initialises its state before every step and the rate stays constant; 'persistent' keeps
    the moments and follows `generator_schedule`."""
    lr = config.lr_generator
    if config.generator_optimizer == "persistent" and config.generator_schedule == "cosine":
        lr = generator_schedule(config)
    return optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


def adapter_optimizer(config):
    """The feature adapter's optimizer. 'frozen' (released: its generator-phase gradient is
    cleared before any student step, and the student loss does not use it) never changes it;
    'sgd' trains it on the generator loss with the student's SGD settings, one step per
    generator step."""
    if config.adapter_optimizer == "frozen":
        return optax.set_to_zero()
    if config.adapter_optimizer != "sgd":
        raise ValueError(f"adapter_optimizer must be 'frozen' or 'sgd', got {config.adapter_optimizer!r}")
    return student_optimizer(config, config.g_steps)
