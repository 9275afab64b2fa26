"""MLP head mapping the student's normalised feature to the teacher's width (contrast only)."""
import flax.linen as nn


class FeatureAdapter(nn.Module):
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.out, name="fc2")(x)
