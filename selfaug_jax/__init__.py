"""selfaug-jax: SelfAug (arXiv 2509.03934) in JAX/Flax NNX.

Fine-tune an LLM on RAG data while keeping its logits on the *input* (prompt) tokens close to the original
model's, which mitigates catastrophic forgetting. See README.md for the quick start.
"""

__version__ = "0.1.0"
