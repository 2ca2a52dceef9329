"""The data section of a run config: every key declared here with its meaning.

Sources live in a ConfigDict keyed by source name, so a sweep can set
`data.sources.general.weight`. A source's tokenized cache depends only on what
changes its tokens (files, tokenizer, template, format, fields, mask policy),
never on weights, seed or sequence length.
"""

import ml_collections

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "xlam",
           "prompt_completion", "text")
MASK_POLICIES = ("assistant", "last", "all")
HISTORY_MODES = ("split", "full")
TOO_LONG_POLICIES = ("drop", "truncate")
PACKING_MODES = ("first_fit", "best_fit", "pad")


def fields_config() -> ml_collections.ConfigDict:
  """Record field names per format; rename here when a corpus differs."""
  return ml_collections.ConfigDict(dict(
      instruction="instruction",  # alpaca: the task
      input="input",  # alpaca: optional extra context appended to the task
      output="output",  # alpaca: the answer
      system="system",  # alpaca / prompt_completion: optional system prompt
      messages="messages",  # messages: the list of turns
      role="role",  # messages: a turn's role (system|user|assistant|tool)
      content="content",  # messages: a turn's text
      conversations="conversations",  # sharegpt: the list of turns
      # sharegpt: role key (human|gpt|system; function_call|observation for
      # tool calls and their results)
      sharegpt_role="from",
      sharegpt_content="value",  # sharegpt: text key
      prompt="prompt",  # prompt_completion: the prompt
      completion="completion",  # prompt_completion: the answer
      text="text",  # text: raw text, loss on every token
      tools="tools",  # messages / sharegpt / xlam: JSON-schema tool list
      tool_calls="tool_calls",  # messages: an assistant turn's tool calls
      # messages: an assistant turn's reasoning trace (`thinking` also read)
      reasoning="reasoning_content",
      query="query",  # xlam: the user's request
      answers="answers",  # xlam: the tool calls that answer it
  ))


def source_config(**kw) -> ml_collections.ConfigDict:
  """One data source; keyword arguments override the declared defaults."""
  cfg = ml_collections.ConfigDict(dict(
      # Local files, globs, or a hub dataset id ("owner/name"); several may be
      # given separated by commas. Local: .jsonl, .json, .parquet, .csv.
      path="",
      split="train",  # hub: split name
      subset="",  # hub: configuration name ("" = the dataset's default)
      revision="",  # hub: git revision ("" = main)
      streaming=True,  # hub / parquet / csv: stream records (no Arrow copy)
      format="auto",  # one of FORMATS; "auto" detects from the first record
      fields=fields_config(),  # record field names
      mask="assistant",  # one of MASK_POLICIES: which tokens carry the loss
      # prompt_completion with a chat template: True renders the prompt as a
      # user turn and the completion as the reply; False concatenates them as
      # plain text (tokenizer BOS, completion + EOS supervised).
      prompt_as_user_turn=True,
      # Keyword arguments for the chat template, e.g. enable_thinking=False
      # (Qwen3); inference renders prompts with the same ones.
      chat_template_kwargs=ml_collections.ConfigDict(),
      # A template that rewrites earlier turns (reasoning stripped, ...):
      # "split" gives each rewritten assistant turn its own example with the
      # context it was generated from; "full" keeps one sequence, the full
      # rendering, each reply supervised where it appears there.
      history="split",
      weight=1.0,  # share of the training example stream (normalised)
      max_records=0,  # read at most this many records (0 = all)
  ))
  cfg.update(kw)
  return cfg


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of a run config, with every key declared."""
  return ml_collections.ConfigDict(dict(
      sources=ml_collections.ConfigDict(),  # name -> source_config(...)
      eval_sources=ml_collections.ConfigDict(),  # name -> source_config(...)
      tokenizer="",  # tokenizer path or hub id ("" = the base model's)
      # Chat template: "" uses the tokenizer's own; otherwise a Jinja string or
      # a path to a .jinja file. The template used is saved with the run.
      chat_template="",
      too_long="truncate",  # drop | truncate (cut the prompt from the left)
      strict=False,  # stop at the first bad record, naming file and line
      packing="first_fit",  # first_fit | best_fit | pad (one example a row)
      packing_bins=32,  # rows packed together per round (more: less padding)
      max_segments_per_row=64,  # static cap on examples packed into one row
      shuffle=True,  # shuffle each source every epoch (seeded)
      cache_dir="~/.cache/sft_jax/data",  # tokenized-source cache
      tokenize_workers=0,  # Processes tokenizing a source: 0 = auto (CPUs - 1, one per 4 MB of it), 1 = none.
      # Grain threads reading examples (0: inline; the cache is memory-mapped,
      # so reads are cheap and threads mostly contend for the GIL).
      read_threads=0,
      prefetch_batches=2,  # batches built ahead in a background thread
  ))


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises DataError on values outside the declared choices."""
  from sft_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  if cfg.too_long not in TOO_LONG_POLICIES:
    raise DataError(f"data.too_long={cfg.too_long!r}; expected one of "
                    f"{TOO_LONG_POLICIES}")
  if cfg.packing not in PACKING_MODES:
    raise DataError(f"data.packing={cfg.packing!r}; expected one of "
                    f"{PACKING_MODES}")
  if cfg.tokenize_workers < 0:
    raise DataError(f"data.tokenize_workers={cfg.tokenize_workers} < 0; "
                    "expected 0 (auto) or a process count")
  for group in ("sources", "eval_sources"):
    for name, src in cfg[group].items():
      if src.format not in FORMATS:
        raise DataError(f"data.{group}.{name}.format={src.format!r}; expected "
                        f"one of {FORMATS}")
      if src.history not in HISTORY_MODES:
        raise DataError(f"data.{group}.{name}.history={src.history!r}; "
                        f"expected one of {HISTORY_MODES}")
      if src.mask not in MASK_POLICIES:
        raise DataError(f"data.{group}.{name}.mask={src.mask!r}; expected one "
                        f"of {MASK_POLICIES}")
      if not src.path:
        raise DataError(f"data.{group}.{name}.path is empty")
      if group == "sources" and src.weight < 0:
        raise DataError(f"data.sources.{name}.weight={src.weight} < 0")
