"""rl_mismatch: the training-inference mismatch in RL fine-tuning of language models.

Importing the package is deliberately light (no flax, torch or tensorflow-datasets);
import the submodule you need, e.g. ``rl_mismatch.optim`` (jax + optax only),
``rl_mismatch.models``, ``rl_mismatch.sampler``, ``rl_mismatch.mismatch``.
"""

__version__ = "0.1.0"
