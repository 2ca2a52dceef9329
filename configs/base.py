"""Base config: every key sft_jax reads, each with a one-line comment.

Experiments fork this file (see configs/tiny.py and configs/presets/) and set
only what differs. Keys are typed: an override must parse as the declared type.
`arg` is unused here; forks use it for knobs that set several keys at once.
"""

from ml_collections import config_dict

from sft_jax.data import config as data_config


def get_config(arg=None):
  del arg
  c = config_dict.ConfigDict()
  c.seed = 0  # RNG seed: random init, LoRA init, data order.

  c.model = config_dict.ConfigDict()
  c.model.path = ""  # HF checkpoint dir or hub id; "" = build from hf_config.
  c.model.init = "pretrained"  # "pretrained" loads model.path; "random" = shape only.
  c.model.hf_config = ""  # JSON HF config fields, used when model.path is "".
  c.model.dtype = "bfloat16"  # Compute dtype of activations and matmuls.
  c.model.param_dtype = "float32"  # Storage dtype of the weights as loaded (the frozen base).
  c.model.trainable_dtype = "float32"  # Trainable weights, grads, optimizer state; "bfloat16" = pure bf16.
  c.model.scan_layers = True  # lax.scan over layers (False = unrolled; same params).
  c.model.remat = "none"  # Layer remat: "none" | "full" | a named policy (models/remat.py).
  c.model.attention = "auto"  # "auto" | "xla" | "xla_chunked" | "splash" | "tokamax" | "cudnn".

  c.method = config_dict.ConfigDict()
  c.method.name = "full"  # "full" | "freeze" (train matches only) | "lora" | "qlora".
  c.method.trainable = ".*"  # freeze: regex over param paths ("layers/mlp/up_proj/kernel").
  c.method.train_top_layers = 0  # freeze: >0 trains only the top N of the stacked layers.
  c.method.lora = config_dict.ConfigDict()
  c.method.lora.rank = 8  # LoRA rank r.
  c.method.lora.alpha = 16.0  # LoRA scale numerator: scale = alpha / r (or / sqrt(r)).
  c.method.lora.rslora = False  # rsLoRA scaling alpha / sqrt(r).
  c.method.lora.dropout = 0.0  # PEFT lora_dropout: on the adapter input, training only.
  c.method.lora.targets = (  # Regex of module names that get adapters.
      r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
  c.method.lora.init_adapter = ""  # PEFT adapter dir to start from ("" = fresh, B = 0).
  c.method.qlora = config_dict.ConfigDict()  # qlora = method.lora over a quantized frozen base.
  c.method.qlora.format = "nf4"  # Layer kernels: "nf4" (4-bit NormalFloat) | "int8".
  c.method.qlora.block_size = 64  # Input rows per absmax scale (divides each kernel's rows).
  c.method.qlora.double_quant = False  # Also quantize the scales (uint8 per 256 columns).

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adamw"  # "adamw" | "sgd" | "lion" | "adafactor".
  c.optim.lr = 1e-5  # Peak learning rate.
  c.optim.schedule = "cosine"  # After warmup: "cosine" | "linear" | "constant".
  c.optim.warmup_steps = 0  # Linear warmup from 0 to lr over this many steps.
  c.optim.end_lr_ratio = 0.0  # cosine/linear: final lr = lr * end_lr_ratio.
  c.optim.b1 = 0.9  # adamw/lion first-moment decay; sgd momentum (0 = none).
  c.optim.b2 = 0.999  # adamw/lion second-moment decay.
  c.optim.eps = 1e-8  # adamw denominator epsilon.
  c.optim.moment_dtype = "float32"  # adamw moments stored as "float32" | "bfloat16" (half the state).
  c.optim.weight_decay = 0.0  # Decoupled weight decay (times lr).
  c.optim.wd_exclude = r"norm|bias|embed"  # Param-path regex kept out of weight decay.
  c.optim.clip_norm = 1.0  # Global gradient-norm clipping (0 = off).
  c.optim.schedule_steps = 0  # Step the schedule ends at (0 = train.steps); set by `train --schedule-on-resume keep`.
  c.optim.schedule_start = 0  # Step the schedule (warmup, decay) starts at; set by `--schedule-on-resume restart`.

  c.train = config_dict.ConfigDict()
  c.train.steps = 1000  # Optimizer steps (also the schedule's length).
  c.train.epochs = 0.0  # >0: passes over the mixture; sets train.steps from its packed size.
  c.train.batch_size = 8  # Global sequences (packed rows) per optimizer step.
  c.train.seq_len = 2048  # Tokens per packed row.
  c.train.grad_accum = 1  # Micro-batches per step; batch_size % grad_accum == 0.
  c.train.ce_chunk = 512  # Positions per CE chunk: rows x ce_chunk x V fp32 logits at a time.
  c.train.z_loss = 0.0  # Weight of z-loss: mean log(Z)^2 over supervised tokens.
  c.train.on_nonfinite = "stop"  # Non-finite loss/grad: "stop" the run or "skip" the update.

  # Distillation (off while teacher and cache are both ""): loss = alpha * CE
  # + (1 - alpha) * tau^2 * divergence(teacher_tau, student_tau) per token.
  c.distill = config_dict.ConfigDict()
  c.distill.teacher = ""  # Online teacher: HF dir or hub id, same vocabulary ("" = none).
  c.distill.teacher_dtype = "bfloat16"  # Online teacher weights and compute: float32 | bfloat16.
  c.distill.alpha = 0.5  # Weight of the CE term; (1 - alpha) weighs the divergence.
  c.distill.temperature = 1.0  # tau: both distributions are softmax(logits / tau).
  c.distill.top_k = 0  # Online: teacher top-k support, both renormalised (0 = full vocab).
  c.distill.divergence = "forward_kl"  # forward_kl | reverse_kl | jsd.
  c.distill.cache = ""  # Offline teacher: dir written by `sft-jax distill-cache` ("" = online).

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 500  # Save every N steps (0 = only at the end); always at the end.
  c.checkpoint.keep = 3  # Keep the last N checkpoints (plus the best, if best_metric is set).
  c.checkpoint.best_metric = ""  # Eval metric whose best step is also kept, e.g. "eval/loss".
  c.checkpoint.best_mode = "min"  # "min" | "max": which way best_metric improves.
  c.checkpoint.async_save = True  # Write checkpoint files in the background.

  c.log = config_dict.ConfigDict()
  c.log.every_steps = 10  # Write train scalars (TensorBoard, metrics.jsonl) every N steps.

  c.eval = config_dict.ConfigDict()
  c.eval.every_steps = 0  # Evaluate on data.eval_sources every N steps and at the end (0 = never).
  c.eval.batch_size = 8  # Global rows per eval batch.
  c.eval.on_start = False  # Also evaluate before the first update (step 0: "before" point).
  c.eval.early_stop_metric = ""  # Stop when this eval metric stalls, e.g. "eval/loss" ("" = never).
  c.eval.early_stop_mode = "min"  # "min" | "max": which way early_stop_metric improves.
  c.eval.early_stop_patience = 3  # Evaluations without improvement before stopping.
  c.eval.early_stop_min_delta = 0.0  # Smallest change that counts as an improvement.
  c.eval.generate = False  # Also evaluate by generation (sft_jax.infer.evaluate) at eval steps.
  c.eval.generate_data = ""  # JSONL of held-out records with reference answers.
  c.eval.generate_max_records = 64  # Records generated per evaluation (0 = all).
  c.eval.generate_max_new_tokens = 128  # Generation budget per record.
  c.eval.generate_metrics = ("exact_match", "rouge_l", "bleu")  # infer.evaluate metric names.
  c.eval.generate_batch_size = 8  # Prompts decoded together.
  # Ranking sets, name -> JSONL of {prompt, candidates, label} (see `sft-jax
  # score`): eval/<name>/top1, top5 and mrr at every evaluation.
  c.eval.ranking = config_dict.ConfigDict()

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = 1  # Data-parallel axis size (-1 = all remaining devices).
  c.mesh.fsdp = -1  # Fully-sharded data-parallel axis size (-1 = remaining).
  c.mesh.tensor = 1  # Tensor-parallel axis size (-1 = remaining).

  # Logical axis name -> comma-separated mesh axes ("" = replicated). A mesh
  # axis that does not divide a dimension is dropped for that array.
  c.sharding = config_dict.ConfigDict()
  c.sharding.rules = config_dict.ConfigDict()
  c.sharding.rules.batch = "data,fsdp"  # Batch rows of inputs and activations.
  c.sharding.rules.length = ""  # Sequence positions.
  c.sharding.rules.embed = "fsdp"  # Model width D.
  c.sharding.rules.vocab = "tensor"  # Vocabulary V.
  c.sharding.rules.heads = "tensor"  # Query heads.
  c.sharding.rules.kv_heads = "tensor"  # Key/value heads.
  c.sharding.rules.head_dim = ""  # Per-head width.
  c.sharding.rules.mlp = "tensor"  # MLP hidden width.
  c.sharding.rules.layers = ""  # Stacked layer axis.
  c.sharding.rules.lora_rank = ""  # LoRA rank r.
  # Activations (rows and positions use "batch" and "length" above).
  c.sharding.rules.act_embed = "tensor"  # Residual stream width D.
  c.sharding.rules.act_heads = "tensor"  # Query heads of q and the attention output.
  c.sharding.rules.act_kv_heads = "tensor"  # Key/value heads of k and v.
  c.sharding.rules.act_mlp = "tensor"  # MLP hidden F.
  c.sharding.rules.act_vocab = "tensor"  # Logits' vocabulary V in the loss chunks.

  c.distributed = config_dict.ConfigDict()
  c.distributed.barrier_timeout_s = 1800.0  # Multi-host: wait this long at a barrier for the other hosts, then fail.
  c.distributed.heartbeat_timeout_s = 100.0  # Multi-host: a process silent this long (dead, hung) stops the others (exit 4).

  c.data = data_config.default_config()  # Sources, mixing, packing: see sft_jax/data.
  return c
