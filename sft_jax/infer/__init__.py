"""Inference on trained models: generation, evaluation by generation, export.

  sampling    next-token choice (greedy, temperature, top-k, top-p)
  generate    batched KV-cache decoding with bucketed static shapes
  prompting   chat templating of prompts, stop ids, evaluation records
  evaluate    generation metrics (exact match, ROUGE-L, BLEU, JSON) + logging
  export      merged Hugging Face export, PEFT adapter export and import
  loading     a run directory or HF checkpoint (+ PEFT adapter) for inference
  cli         `sft-jax generate | chat | eval | export`
"""
