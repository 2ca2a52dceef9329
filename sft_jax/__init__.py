"""sft_jax: supervised fine-tuning of open causal language models in JAX/Flax.

Data flows one way:

  records -> sft_jax.data   -> packed batch {tokens, targets, loss_mask,
                                             segment_ids, positions, source_id}
  HF dir  -> sft_jax.models -> (ModelConfig, params pytree)
  both    -> sft_jax.train  -> jitted train_step over a mesh -> checkpoints
  run     -> sft_jax.infer  -> generate / eval / export
"""

__version__ = "0.1.0"
