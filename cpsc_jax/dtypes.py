"""Float precision rules shared by networks and losses."""
import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, or wider when it already is (float64 runs, e.g. the parity tests).

    Statistics and losses are never computed in bfloat16/float16; float64 inputs stay float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
