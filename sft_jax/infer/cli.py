"""`sft-jax generate | chat | eval | export`."""

import argparse
import json
import logging
import os
import re
import sys

from sft_jax import errors

_MODEL_HELP = (
    "a run directory (sft-jax train --workdir; recognised by its "
    "checkpoints/ folder), a Hugging Face model directory, or a hub id")


def _add_model_args(parser, *, flag="--model", help_text=_MODEL_HELP):
  parser.add_argument(flag, required=True, metavar="DIR_OR_RUN",
                      help=help_text)
  parser.add_argument("--step", type=int, default=None, metavar="N",
                      help="checkpoint step of a run (default: the latest)")
  parser.add_argument("--adapter", default=None, metavar="DIR",
                      help="a PEFT LoRA adapter directory to apply over the "
                      "model (e.g. one written by `sft-jax export --adapter` "
                      "or by peft)")
  parser.add_argument("--dtype", default=None,
                      choices=("float32", "bfloat16", "float16"),
                      help="compute dtype (default: the run's or float32)")


def _add_generation_args(parser, max_new_tokens=256):
  g = parser.add_argument_group("generation")
  g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                 metavar="N",
                 help=f"tokens generated at most (default {max_new_tokens})")
  g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                 help="0 (default) decodes greedily; > 0 samples")
  g.add_argument("--top-k", type=int, default=0, metavar="K",
                 help="sample among the k likeliest tokens (0: all)")
  g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                 help="sample within the top-p probability mass (1: all)")
  g.add_argument("--seed", type=int, default=0, metavar="N",
                 help="sampling seed (default 0)")
  g.add_argument("--batch-size", type=int, default=8, metavar="N",
                 help="prompts decoded together (default 8)")


def _sampling(args):
  from sft_jax.infer import sampling  # pylint: disable=g-import-not-at-top
  return sampling.Sampling(temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p)


def _load(args, model):
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top
  return loading.load(model, step=args.step, adapter=args.adapter,
                      dtype=args.dtype, merge_lora=True)


def generate_main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="sft-jax generate",
      description="""\
Generate text from a model or a training run. Prompts are rendered with the
model's chat template (for a run, the exact one it trained with) unless
--raw. Generation stops at EOS, at the template's end-of-turn token, or after
--max-new-tokens.""",
      epilog="""\
--data lines: {"prompt": TEXT} (a user turn, or plain text with --raw),
{"messages": [...]} (a trailing assistant turn is dropped), or any training
record format.

examples:
  sft-jax generate --model runs/demo --prompt 'Hello!'
  sft-jax generate --model Qwen/Qwen2.5-0.5B-Instruct \\
      --data prompts.jsonl --out completions.jsonl --temperature 0.7""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(parser)
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeat for several)")
  src.add_argument("--data", metavar="FILE",
                   help="a JSONL file of prompt records")
  parser.add_argument("--raw", action="store_true",
                      help="tokenize prompts as plain text (tokenizer BOS), "
                      "without the chat template")
  parser.add_argument("--out", metavar="FILE", default=None,
                      help="write JSONL {prompt, completion, stopped} here "
                      "(default: completions to stdout)")
  _add_generation_args(parser)
  args = parser.parse_args(argv)

  from sft_jax.infer import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  if args.prompt:
    prompts = [p if args.raw else [{"role": "user", "content": p}]
               for p in args.prompt]
    tools = [None] * len(prompts)
  else:
    rows = prompting.read_jsonl(args.data)
    prompts = [prompting.prompt_of_record(r, where, raw=args.raw)
               for r, where in rows]
    tools = [prompting.tools_of_record(r, where) for r, where in rows]
    if not prompts:
      raise errors.UserError(f"{args.data}: no records (the file is empty)",
                             what="data")
  if args.out:  # before generating: nothing generated is lost to a bad path
    errors.check_writable_dir(os.path.dirname(os.path.abspath(args.out)),
                              what="--out")
  loaded = _load(args, args.model)
  kwargs = _template_kwargs(args.model)
  ids = [prompting.encode_prompt(loaded.tokenizer, p, raw=args.raw,
                                 template_kwargs=kwargs, tools=t)
         for p, t in zip(prompts, tools)]
  completions = generate_lib.generate(
      loaded.model_cfg, loaded.variables, ids,
      max_new_tokens=args.max_new_tokens, stop_ids=loaded.stop_ids,
      sampling=_sampling(args), seed=args.seed, batch_size=args.batch_size)
  texts = [prompting.decode(loaded.tokenizer, c.content_tokens)
           for c in completions]
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      for p, t, c in zip(prompts, texts, completions):
        f.write(json.dumps({"prompt": p, "completion": t,
                            "stopped": c.stopped}, ensure_ascii=False) + "\n")
    print(f"wrote {len(texts)} completions to {args.out}", file=sys.stderr)
  elif args.data:
    for p, t, c in zip(prompts, texts, completions):
      print(json.dumps({"prompt": p, "completion": t, "stopped": c.stopped},
                       ensure_ascii=False))
  else:
    print("\n\n".join(texts))
  return 0


def chat_main(argv=None, *, input_fn=input, print_fn=print) -> int:
  parser = argparse.ArgumentParser(
      prog="sft-jax chat",
      description="""\
Chat with a model or a training run in the terminal, using its chat
template. Commands: /reset starts over, /exit (or Ctrl-D) quits.""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(parser)
  parser.add_argument("--system", default=None,
                      help="a system prompt opening the conversation")
  _add_generation_args(parser, max_new_tokens=512)
  args = parser.parse_args(argv)

  from sft_jax.infer import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  loaded = _load(args, args.model)
  if loaded.tokenizer.chat_template is None:
    raise errors.UserError(f"{args.model}: the tokenizer has no chat "
                           "template; use `sft-jax generate --raw` instead",
                           what="model")
  opening = ([{"role": "system", "content": args.system}]
             if args.system else [])
  messages = list(opening)
  turn = 0
  while True:
    try:
      text = input_fn("you> ")
    except EOFError:
      print_fn("")
      return 0
    if text.strip() == "/exit":
      return 0
    if text.strip() == "/reset":
      messages = list(opening)
      print_fn("(conversation cleared)")
      continue
    if not text.strip():
      continue
    messages.append({"role": "user", "content": text})
    ids = prompting.encode_prompt(loaded.tokenizer, messages,
                                  template_kwargs=_template_kwargs(args.model))
    completion = generate_lib.generate(
        loaded.model_cfg, loaded.variables, [ids],
        max_new_tokens=args.max_new_tokens, stop_ids=loaded.stop_ids,
        sampling=_sampling(args), seed=args.seed + turn)[0]
    reply = prompting.decode(loaded.tokenizer, completion.content_tokens)
    messages.append({"role": "assistant", "content": reply})
    print_fn(f"assistant> {reply}")
    turn += 1


def _template_kwargs(model: str) -> dict:
  """A run renders prompts with the template kwargs it trained with."""
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  return (prompting.template_kwargs_of_run(model)
          if loading.is_run_dir(model) else {})


def _record_options(run_dir: str) -> dict:
  """Record field names and prompt rendering of a run's training sources,
  so evaluation prompts are rendered as training rendered them."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    data = json.load(f)["data"]
  sources = list(data.get("eval_sources", {}).values()) or list(
      data.get("sources", {}).values())
  options = {json.dumps([s.get("fields"), s.get("prompt_as_user_turn", True)],
                        sort_keys=True) for s in sources}
  if len(options) != 1:
    # No source, or sources that disagree: the default field names.
    return dict(fields=None, prompt_as_user_turn=True)
  source = sources[0]
  import ml_collections  # pylint: disable=g-import-not-at-top
  fields = source.get("fields")
  return dict(
      fields=ml_collections.ConfigDict(fields) if fields else None,
      prompt_as_user_turn=bool(source.get("prompt_as_user_turn", True)))


def _loss_eval(parser, args, run_dir, names) -> None:
  """Prints (and for a run, logs) the loss metrics `names` of every set."""
  from sft_jax.infer import loss_eval  # pylint: disable=g-import-not-at-top
  try:
    files = loss_eval.parse_data(args.data)
  except ValueError as e:
    parser.error(str(e))
  for path in files.values():
    if not os.path.exists(path):
      parser.error(f"--data {path}: no such file")
  loaded = _load(args, args.run)
  try:
    results, seq_len = loss_eval.evaluate(
        loaded, files, seq_len=args.seq_len, batch_size=args.batch_size)
  except ValueError as e:
    parser.error(str(e))
  step = loaded.step or 0
  print(f"loss evaluation of {args.run}" + (
      f" at step {step}" if run_dir else "") + f" (rows of {seq_len} tokens)")
  for name, values in results.items():
    print(f"{name}: " + "  ".join(f"{m} {values[m]:.4f}" for m in names) +
          f"  ({int(values['tokens'])} tokens)")
  out_dir = args.out or (os.path.join(run_dir, "eval") if run_dir else None)
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"loss_step_{step}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"model": args.run, "step": step, "seq_len": seq_len,
                 "sets": results}, f, indent=1)
    print(f"wrote {path}", file=sys.stderr)
  if run_dir is not None:
    import tensorboard.summary  # pylint: disable=g-import-not-at-top
    writer = tensorboard.summary.Writer(os.path.join(run_dir, "tb"))
    for name, values in results.items():
      prefix = "eval" if name == "all" else f"eval/{name}"
      for m in names:
        writer.add_scalar(f"{prefix}/{loss_eval.METRICS[m]}", values[m],
                          step=step)
    writer.close()


def eval_main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="sft-jax eval",
      description="""\
Evaluate a run (or any model) on held-out data, in two ways:

by loss (--metrics loss,perplexity,token_accuracy): the reference answers of
every --data set (or, for a run, its data.eval_sources) go through the
training pipeline, with the run's masks, template and packing, and the
per-token loss, perplexity and next-token accuracy of the supervised tokens
are reported per set and pooled ("all"). RUN/eval/loss_step_<step>.json and
TensorBoard tags eval/<set>/{loss,perplexity,accuracy} at the checkpoint step.

by generation (exact_match, rouge_l, bleu, json_valid, json_schema): answers
to the prompts of --data (greedy unless --temperature) are scored against
the references. Metrics go to the run's TensorBoard (RUN/tb, tags
gen_<name>/<metric>) and, with every sample generation, to
RUN/eval/gen_<name>_step_<step>.json.""",
      epilog="""\
--data records: any training record format (messages, sharegpt, alpaca,
prompt_completion); the last assistant turn (completion, output) is the
reference and the turns before it the prompt.

metrics: loss, perplexity, token_accuracy (teacher-forced, on the
supervised tokens); exact_match (after stripping whitespace), rouge_l
(F-measure), bleu (sacrebleu corpus BLEU, 0-100), json_valid, json_schema
(needs --json-schema).

examples:
  sft-jax eval --run runs/tiny --metrics loss,perplexity,token_accuracy
  sft-jax eval --run runs/tiny --step 40 --metrics loss \\
      --data chat=configs/tiny_data/chat.jsonl --data configs/tiny_data/eval.jsonl
  sft-jax eval --run runs/tiny --data configs/tiny_data/eval.jsonl""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(parser, flag="--run", help_text=_MODEL_HELP)
  parser.add_argument("--data", action="append", default=[],
                      metavar="[NAME=]FILE",
                      help="evaluation records with reference answers; "
                      "repeat for several sets (loss metrics; NAME defaults "
                      "to the file's stem). Loss metrics on a run default to "
                      "its data.eval_sources")
  parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                      help="loss metrics: packed row length (default: the "
                      "run's train.seq_len, or 2048)")
  parser.add_argument("--metrics", default="exact_match,rouge_l,bleu",
                      help="comma-separated metric names "
                      "(default exact_match,rouge_l,bleu)")
  parser.add_argument("--json-schema", default=None, metavar="FILE",
                      help="a JSON Schema file; adds the json_valid and "
                      "json_schema metrics")
  parser.add_argument("--out", default=None, metavar="DIR",
                      help="directory of every output: the results JSON and "
                      "TensorBoard events (OUT/tb) (default: RUN/eval and "
                      "RUN/tb for a run; required otherwise)")
  parser.add_argument("--name", default=None,
                      help="name of this evaluation in TensorBoard tags and "
                      "file names (default: the data file's stem)")
  _add_generation_args(parser)
  args = parser.parse_args(argv)

  from sft_jax.infer import evaluate  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import loss_eval  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import prompting  # pylint: disable=g-import-not-at-top
  run_dir = args.run if loading.is_run_dir(args.run) else None
  metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  loss_names = [m for m in metrics if m in loss_eval.METRICS]
  metrics = [m for m in metrics if m not in loss_eval.METRICS]
  if loss_names:
    _loss_eval(parser, args, run_dir, loss_names)
  if not metrics:
    return 0
  if run_dir is None and args.out is None:
    parser.error("--out is required when --run is not a run directory")
  if len(args.data) != 1:
    parser.error("generation metrics need exactly one --data FILE")
  args.data = args.data[0]
  schema = None
  if args.json_schema:
    schema = errors.read_json(args.json_schema, what="data")
    metrics += [m for m in ("json_valid", "json_schema") if m not in metrics]
  rows = prompting.read_jsonl(args.data)
  if not rows:
    raise errors.UserError(f"{args.data}: no records (the file is empty)",
                             what="data")
  options = (_record_options(args.run) if run_dir is not None
             else dict(fields=None, prompt_as_user_turn=True))
  for record, where in rows:  # fail on a bad record before loading weights
    prompting.split_record(record, where, **options)
  # ... and on an output directory that cannot be written, before generating.
  out_dir = args.out or os.path.join(run_dir, "eval")
  errors.check_writable_dir(out_dir, what="--out" if args.out else "run")
  tb_dir = os.path.join(args.out, "tb") if args.out else os.path.join(
      run_dir, "tb")
  loaded = _load(args, args.run)
  result, samples = evaluate.generation_metrics(
      loaded.model_cfg, loaded.variables, loaded.tokenizer,
      [r for r, _ in rows], max_new_tokens=args.max_new_tokens,
      metrics=metrics, json_schema=schema, sampling=_sampling(args),
      batch_size=args.batch_size, seed=args.seed, stop_ids=loaded.stop_ids,
      template_kwargs=_template_kwargs(args.run), **options)
  name = args.name or os.path.splitext(os.path.basename(args.data))[0]
  prefix = "gen_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
  # The results first: nothing after generation may lose them.
  path = evaluate.write_results(out_dir, loaded.step or 0, result, samples,
                                prefix=prefix)
  for k, v in result.items():
    print(f"{k}: {v:.4f}")
  print(f"wrote {path}", file=sys.stderr)
  if run_dir is not None or args.out:
    try:
      import tensorboard.summary  # pylint: disable=g-import-not-at-top
      writer = tensorboard.summary.Writer(tb_dir)
      evaluate.write_results(out_dir, loaded.step or 0, result, [],
                             prefix=prefix, writer=writer, json_file=False)
      writer.close()
    except OSError as e:
      logging.getLogger("sft_jax").warning(
          "%s: TensorBoard events not written (%s); the results are in %s",
          tb_dir, e, path)
  return 0


def export_main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="sft-jax export",
      description="""\
Export a training run to Hugging Face format.

  --merge    folds LoRA into the base weights and writes a standalone
             transformers checkpoint: config.json, safetensors (sharded
             above --max-shard-size), generation_config.json (stopping at
             EOS and the chat template's end of turn), and the run's
             tokenizer files byte for byte, chat template included.
  --adapter  writes a PEFT adapter (adapter_config.json +
             adapter_model.safetensors) recording the base model's path or
             hub id, plus the tokenizer files.""",
      epilog="""\
serve the result:
  merged:  transformers.AutoModelForCausalLM.from_pretrained(OUT),
           or `vllm serve OUT`
  adapter: peft.AutoPeftModelForCausalLM.from_pretrained(OUT)""",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", required=True, metavar="DIR",
                      help="the run directory (sft-jax train --workdir)")
  parser.add_argument("--step", type=int, default=None, metavar="N",
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--out", required=True, metavar="HF_DIR",
                      help="output directory (created)")
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--merge", action="store_true",
                    help="write merged full weights")
  mode.add_argument("--adapter", action="store_true",
                    help="write a PEFT LoRA adapter (LoRA runs only)")
  parser.add_argument("--dtype", default=None,
                      choices=("float32", "bfloat16", "float16"),
                      help="weight dtype on disk (default: the params' dtype)")
  parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                      help="largest safetensors shard of a merged export "
                      "(default 5GB)")
  args = parser.parse_args(argv)

  from sft_jax.infer import export  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top
  if not loading.is_run_dir(args.run):
    raise errors.WorkdirError(f"{args.run}: not a run directory (no "
                              "checkpoints/); give a --workdir of "
                              "`sft-jax train`", what="run")
  errors.check_writable_dir(args.out, what="--out")
  loaded = loading.load(args.run, step=args.step)
  if args.merge:
    export.export_merged(
        loaded.model_cfg, loaded.variables["params"],
        loaded.variables.get("lora"), args.out, tokenizer=loaded.tokenizer,
        tokenizer_files=loaded.tokenizer_files,
        base_model=loaded.base_model, dtype=args.dtype,
        max_shard_size=args.max_shard_size)
  else:
    if "lora" not in loaded.variables:
      raise errors.UserError(f"{args.run}: a full fine-tune (no LoRA) has "
                             "no adapter; use --merge", what="run")
    export.export_adapter(
        loaded.model_cfg, loaded.variables["lora"], args.out,
        base_model=loaded.base_model, dtype=args.dtype,
        tokenizer=loaded.tokenizer, tokenizer_files=loaded.tokenizer_files)
  print(f"exported step {loaded.step} of {args.run} to {args.out}",
        file=sys.stderr)
  return 0
