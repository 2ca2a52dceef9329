"""`sft-jax data dump` and `sft-jax data inspect`.

dump writes one JSON line per kept example, before packing:
{"input_ids": [...], "loss_mask": [...]} (the mask over input_ids, 1 where the
token is supervised; training shifts both by one). inspect is the data doctor.
"""

import argparse
import json
import os
import sys

from sft_jax.data import cache
from sft_jax.data import config as config_lib
from sft_jax.data import doctor
from sft_jax.data import pipeline
from sft_jax.data import render
from sft_jax.data.errors import DataError, DropLog, RenderLog


def _add_source_args(p, data_help):
  p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory or hub id")
  p.add_argument("--data", action="append", default=[], metavar="FILES",
                 help=data_help)
  p.add_argument("--format", default="auto", choices=config_lib.FORMATS,
                 metavar="FORMAT",
                 help="auto | alpaca | messages | sharegpt | xlam | "
                 "prompt_completion | text (default: auto, detected per "
                 "source)")
  p.add_argument("--mask", default="assistant",
                 choices=config_lib.MASK_POLICIES,
                 help="supervised tokens: every assistant turn, the last "
                 "one, or all tokens (default: assistant)")
  p.add_argument("--chat-template", default="", metavar="TEMPLATE",
                 help="Jinja template text or .jinja file replacing the "
                 "tokenizer's own")
  p.add_argument("--template-kwargs", default="{}", metavar="JSON",
                 help='keyword arguments for the chat template, e.g. '
                 '\'{"enable_thinking": false}\' (default: none)')
  p.add_argument("--history", default="split",
                 choices=config_lib.HISTORY_MODES,
                 help="a template that rewrites earlier turns: give each "
                 "such turn its own example with its generation-time "
                 "context (split), or keep the full rendering (default: "
                 "split)")
  p.add_argument("--too-long", default="truncate",
                 choices=config_lib.TOO_LONG_POLICIES,
                 help="over-long examples: cut the prompt from the left "
                 "keeping the final reply, or drop (default: truncate)")
  p.add_argument("--strict", action="store_true",
                 help="stop at the first bad record, naming file and line")


def _parser():
  parser = argparse.ArgumentParser(
      prog="sft-jax data",
      description="Data tools: audit token masks (dump) and diagnose a "
      "corpus (inspect).")
  sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
  dump = sub.add_parser(
      "dump", help="write input_ids and loss_mask of every kept example",
      description="Tokenize records exactly as training does and write one "
      'JSON line per kept example: {"input_ids": [...], "loss_mask": [...]} '
      "(before packing and shifting). Dropped records are counted by reason "
      "on the console.")
  _add_source_args(dump, "FILE[,FILE...] or glob, or a hub dataset id "
                   "(repeatable; all one source)")
  dump.add_argument("--max-length", type=int, default=0, metavar="N",
                    help="fit examples to N tokens (0 = no limit)")
  dump.add_argument("--out", required=True, metavar="OUT.jsonl", help="output .jsonl path")
  insp = sub.add_parser(
      "inspect", help="the data doctor: counts, drops, lengths, packing, "
      "duplicates, rendered examples",
      description="Report per source: records kept and dropped by reason, "
      "token-length percentiles, supervised-token fraction, truncations, "
      "packing efficiency at the sequence length; exact and near-duplicates "
      "within and across train/eval; a few rendered examples with the "
      "supervised tokens highlighted. Reads a run config (--config) or "
      "files (--tokenizer, --data, --eval-data).")
  insp.add_argument("--config", default="", metavar="CONFIG",
                    help="run config `path.py[:arg]` (`--config.KEY=VALUE` "
                    "overrides may follow), or a run directory")
  _add_source_args(insp, "training FILE[,FILE...] or glob (repeatable: one "
                   "source each)")
  insp.add_argument("--eval-data", action="append", default=[],
                    metavar="FILES",
                    help="eval FILE[,FILE...] (repeatable: one set each)")
  insp.add_argument("--seq-len", type=int, default=0, metavar="T",
                    help="row length for truncation and packing efficiency "
                    "(default: the config's train.seq_len, else 2048)")
  insp.add_argument("--packing", default="first_fit",
                    choices=config_lib.PACKING_MODES,
                    help="packer for the efficiency figure (files mode)")
  insp.add_argument("--examples", type=int, default=3, metavar="K",
                    help="rendered examples shown per source (default 3)")
  insp.add_argument("--near-threshold", type=float, default=0.8,
                    metavar="J",
                    help="MinHash Jaccard estimate counted as near-duplicate")
  insp.add_argument("--color", default="auto",
                    choices=("auto", "always", "never"),
                    help="highlight supervised tokens in colour (else [[...]])")
  insp.add_argument("--cache-dir", default="", metavar="DIR",
                    help="tokenized-source cache (default: the config's)")
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, rest = _parser().parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad or (rest and args.cmd != "inspect"):
    _parser().error(f"unrecognized arguments: {' '.join(bad or rest)}")
  # A DataError is a user error: the `sft-jax` dispatcher prints it as one
  # line and exits 2.
  if args.cmd == "dump":
    return _dump(args)
  return _inspect(args, rest)


def _dump(args) -> int:
  if not args.tokenizer or not args.data:
    raise DataError("dump needs --tokenizer and --data")
  tok = render.load_tokenizer(args.tokenizer, args.chat_template or None)
  src = _source(",".join(args.data), args)
  drops, log = DropLog(), RenderLog()
  stream = cache.encode_records(src, tok, render.chat_template(
      config_lib.default_config(), tok), strict=args.strict, drops=drops,
                                log=log)
  fmt = next(stream)
  kept = truncated = split = 0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    for where, ids, mask in stream:
      if args.max_length:
        fitted, fitted_mask, status = pipeline.fit_length(
            ids, mask, args.max_length, args.too_long, tok.bos_token_id)
        if status == "too_long":
          if args.strict:
            raise DataError(f"{where}: too_long: longer than --max-length "
                            f"{args.max_length}")
          drops.add("too_long", where, f"> {args.max_length} tokens")
          continue
        truncated += status == "truncated"
        split += status == "split"
        if status == "split":  # one line per row, as training sees it
          rows = [(ids[s:s + args.max_length], mask[s:s + args.max_length])
                  for s in pipeline.split_starts(len(ids), args.max_length)]
        else:
          rows = [(fitted, fitted_mask)]
      else:
        rows = [(ids, mask)]
      for row_ids, row_mask in rows:
        f.write(json.dumps({"input_ids": row_ids.tolist(),
                            "loss_mask": row_mask.tolist()}) + "\n")
      kept += 1
  if not kept:
    os.remove(args.out)
    raise DataError(cache.no_examples_message(f"--data {','.join(args.data)}",
                                              drops))
  print(f"format: {fmt}; wrote {kept} examples to {args.out} "
        f"({truncated} truncated, {split} split into rows)")
  print(f"masks: {log.method}")
  if log.first_disagreement:
    print(f"  generation markers disagree (the rule is used), first at "
          f"{log.first_disagreement}")
  print(drops.summary())
  return 0


def _source(path, args):
  """A source config from the command line's options."""
  try:
    kwargs = json.loads(args.template_kwargs)
  except json.JSONDecodeError as e:
    raise DataError(f"--template-kwargs: not valid JSON ({e.msg})") from None
  if not isinstance(kwargs, dict):
    raise DataError("--template-kwargs must be a JSON object")
  return config_lib.source_config(path=path, format=args.format,
                                  mask=args.mask, history=args.history,
                                  chat_template_kwargs=kwargs)


def _inspect_config(args, overrides):
  """(data config, tokenizer id, seq_len) from --config or from files."""
  if args.config:
    cfg = _load_run_config(args.config, overrides)
    data_cfg = cfg.data
    tokenizer = args.tokenizer or data_cfg.tokenizer or cfg.model.path
    seq_len = args.seq_len or cfg.train.seq_len
    if args.cache_dir:
      data_cfg.cache_dir = args.cache_dir
    return data_cfg, tokenizer, seq_len
  if not args.tokenizer or not args.data:
    raise DataError("inspect needs --config, or --tokenizer and --data")
  data_cfg = config_lib.default_config()
  data_cfg.chat_template = args.chat_template
  data_cfg.too_long = args.too_long
  data_cfg.strict = args.strict
  data_cfg.packing = args.packing
  if args.cache_dir:
    data_cfg.cache_dir = args.cache_dir
  for group, specs in (("sources", args.data), ("eval_sources",
                                                args.eval_data)):
    for k, spec in enumerate(specs):
      stem = os.path.basename(spec.split(",")[0]).split(".")[0] or "data"
      name = stem if stem not in data_cfg[group] else f"{stem}_{k}"
      data_cfg[group][name] = _source(spec, args)
  return data_cfg, args.tokenizer, args.seq_len or 2048


def _load_run_config(spec, overrides):
  """A config file `path.py[:arg]`, or a run directory / its config.json."""
  path = spec.partition(":")[0] if spec.endswith(".py") or ".py:" in spec \
      else spec
  if os.path.isdir(path) or path.endswith(".json"):
    import ml_collections  # pylint: disable=g-import-not-at-top
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise DataError(f"{file}: no such run config")
    with open(file, encoding="utf-8") as f:
      cfg = ml_collections.ConfigDict(json.load(f))
    if overrides:
      raise DataError("--config.KEY overrides apply to .py configs only")
    return cfg
  try:
    from sft_jax.train import config as train_config  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("--config needs sft_jax.train.config, which is not "
                    f"available ({e}); give --tokenizer and --data") from e
  try:
    return train_config.load_config(spec, overrides)
  except train_config.ConfigError as e:
    raise DataError(f"--config {spec}: {e}") from e


def _inspect(args, overrides) -> int:
  data_cfg, tokenizer, seq_len = _inspect_config(args, overrides)
  if not tokenizer:
    raise DataError("no tokenizer: give --tokenizer (or set data.tokenizer / "
                    "model.path in the config)")
  tok = render.load_tokenizer(tokenizer, data_cfg.chat_template or None)
  config_lib.validate(data_cfg)
  color = args.color == "always" or (args.color == "auto" and
                                     sys.stdout.isatty())
  print(f"tokenizer: {tokenizer}   seq_len: {seq_len}   packing: "
        f"{data_cfg.packing}   too_long: {data_cfg.too_long}")
  prepared = []
  for split, group in (("train", "sources"), ("eval", "eval_sources")):
    for name in sorted(data_cfg[group].keys()):
      src = data_cfg[group][name]
      p = pipeline.prepare_source(name, src, data_cfg, tok, seq_len=seq_len)
      prepared.append((split, name, p))
      r = doctor.source_report(name, split, p, data_cfg, tok, seq_len)
      print(f"\n== {split} source {name!r}: {src.path}  (format "
            f"{p.tokenized.fmt}, mask {src.mask}"
            + (f", weight {src.weight}" if split == "train" else "") + ")")
      log = p.tokenized.render
      print(f"  records: {log.records} kept, {r.drops.total} dropped; "
            f"examples: {r.kept} kept, {r.truncated} truncated, "
            f"{r.num_split} split into rows")
      print(f"  masks: {log.method}")
      if log.appended_eos:
        print(f"    {log.appended_eos} turns ended by an appended EOS (the "
              "template writes no end-of-turn token after the last reply)")
      if log.reasoning_lost:
        print(f"    {log.reasoning_lost} turns carry reasoning the template "
              "does not render: it is not trained (DeepSeek-R1 and QwQ drop "
              "it from every reply)")
      if log.first_disagreement:
        print("    generation markers disagree with the rule (the rule is "
              f"used); first at {log.first_disagreement}")
      for line in r.drops.summary("  dropped", places=True).splitlines()[1:]:
        print("  " + line)
      pct = "  ".join(f"p{k}={v}" for k, v in r.length_pct.items())
      print(f"  tokens per example: {pct or '-'}")
      print(f"  supervised-token fraction: {r.supervised_fraction:.3f}")
      print(f"  packing efficiency at {seq_len}: {r.packing_efficiency:.3f}")
  dups = doctor.find_duplicates([(s, p) for s, _, p in prepared], tok,
                                args.near_threshold)
  print("\n== duplicates (pairs)")
  for kind, counts in (("exact", dups.exact), (
      f"near (>= {args.near_threshold})", dups.near)):
    text = ", ".join(f"{a}/{b}: {n}" for (a, b), n in sorted(counts.items()))
    print(f"  {kind}: {text or 'none'}")
  for kind, wa, wb in dups.examples:
    print(f"    {kind}: {wa} ~ {wb}")
  if args.examples:
    marks = "colour" if color else "[[...]]"
    print(f"\n== examples (supervised tokens in {marks})")
    for split, name, p in prepared:
      for i in p.keep[:args.examples]:
        ids, mask = p.tokenized.example(int(i))
        print(f"--- {split} {name}: {p.tokenized.where(int(i))}")
        print(doctor.highlight(tok, ids, mask, color))
  return 0
