"""Two-stage logprob-ranking SFT: mixed SFT, then ranking SFT; read out ranks.

Study: a model fine-tuned (stage 1) on domain + general data, then (stage 2)
on targets that are candidate lists ordered by relevance, the right one first.
The log-probability of each candidate as the completion of the prompt is the
ranking score (`sft-jax score`). Reported before and after each stage: top-1,
top-5 accuracy and MRR on held-out ranking lines, and the general-data loss
(how much general ability stage 2 costs).

Demo scale (CPU, minutes; everything built locally, no downloads):
  python experiments/two_stage_ranking.py --workdir runs/two_stage
    domain  synthetic incident postmortems: "Incident <id> in <service>
            (<region>) since <time>: <symptom>." -> "Root cause: <X>."
            (12 symptoms, each with one root cause)
    ranking the same kind of incident + "Ranked causes:" -> 8 candidate causes,
            the right one first (stage 2 target); held-out lines list the 8
            candidates shuffled with the right one's index as the label
    general the demo's chitchat text; the base is the demo's randomly
            initialised small Llama (sft_jax/demo/assets.py)

Real scale (`:scale=real`): the same two stages on Llama-2-7B with LoRA,
UltraChat as the general data, and your own domain / ranking JSONL files
(knobs domain=, rank_train=, rank_eval=; ranking lines as above):
  sft-jax train --config experiments/two_stage_ranking.py:scale=real,stage=1,\
domain=D.jsonl,rank_eval=E.jsonl --workdir runs/r1
  (export runs/r1 to HF, then stage=2,init=DIR,rank_train=T.jsonl)
"""

import argparse
import json
import os
import pathlib
import random
import sys

from sft_jax.data import config as data_config
from sft_jax.train import config as config_lib

BASE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
NUM_CANDIDATES = 8


def _knobs(arg):
  return config_lib.parse_arg(arg, scale="demo", stage=1,
                              root="runs/two_stage", init="", domain="",
                              rank_train="", rank_eval="", steps=0)


def get_config(arg=None):
  k = _knobs(arg)
  c = config_lib.get_config_from_file(str(BASE))
  c.seed = 0
  real = k.scale == "real"
  files = _files(k.root)

  def pc(path, **kw):  # prompt/completion, plain text: what `score` reads
    return data_config.source_config(path=path, format="prompt_completion",
                                     prompt_as_user_turn=False, **kw)

  general = data_config.source_config(
      path="HuggingFaceH4/ultrachat_200k" if real else files["general_train"],
      split="train_sft", format="messages" if real else "text")
  general_eval = data_config.source_config(
      path="HuggingFaceH4/ultrachat_200k" if real else files["general_eval"],
      split="test_sft", format="messages" if real else "text",
      max_records=512 if real else 0)
  if k.stage == 1:
    c.data.sources.domain = pc(k.domain or files["domain_pc"], weight=0.75)
    c.data.sources.general = general
    c.data.sources.general.weight = 0.25
  else:
    c.data.sources.ranking = pc(k.rank_train or files["rank_train"])
  c.data.eval_sources.general = general_eval
  c.eval.ranking.rank = k.rank_eval or files["rank_eval"]
  c.eval.batch_size = 8
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.1
  if real:
    c.model.path = k.init or "meta-llama/Llama-2-7b-hf"
    c.method.name = "lora"
    c.method.lora.rank = 16
    c.method.lora.alpha = 32.0
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 50
    c.train.steps = k.steps or (2000 if k.stage == 1 else 500)
    c.train.batch_size = 32
    c.train.seq_len = 4096
    c.train.ce_chunk = 1024
    c.model.remat = "full"
    c.eval.every_steps = 250
    c.checkpoint.every_steps = 250
  else:
    c.model.path = k.init or os.path.join(k.root, "base")
    c.model.dtype = "float32"
    c.method.name = "full"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    c.train.steps = k.steps or (300 if k.stage == 1 else 150)
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.ce_chunk = 256
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.eval.every_steps = c.train.steps  # at the end
    c.checkpoint.every_steps = 0
    c.data.cache_dir = os.path.join(k.root, "cache")
    c.data.packing_bins = 16
    c.log.every_steps = 25
  return c


# `sft-jax sweep`: stage 1 over the share of general data, stage 2 over lr.
SUMMARY_METRICS = ("eval/rank/top1", "eval/rank/mrr", "eval/general/loss")


def get_sweep(arg=None):
  k = _knobs(arg)
  if k.stage == 1:
    return [{"data.sources.general.weight": s,
             "data.sources.domain.weight": 1.0 - s} for s in (0.1, 0.25, 0.5)]
  lr = get_config(arg).optim.lr
  return [{"optim.lr": lr * f} for f in (0.3, 1.0, 3.0)]


def _files(root: str) -> dict[str, str]:
  d = os.path.join(root, "data")
  return {n: os.path.join(d, f"{n}.jsonl") for n in (
      "general_train", "general_eval", "domain_pc", "rank_train", "rank_eval")}


# Incident symptom -> root cause: the association both stages teach.
CAUSES = {
    "p99 latency above two seconds": "database connection pool exhausted",
    "HTTP 502 from the load balancer": "upstream pods crash looping",
    "disk usage at 98 percent": "log rotation disabled",
    "pods OOMKilled every few minutes": "memory leak in the new release",
    "TLS handshake failures": "expired certificate",
    "queue depth growing without bound": "consumer group stalled",
    "error rate spike right after a deploy": "bad config pushed in the deploy",
    "timeouts calling the cache": "cache cluster failover",
    "DNS resolution errors": "resolver misconfiguration",
    "CPU throttling on every node": "CPU limits set too low",
    "replication lag over ten minutes": "long running schema migration",
    "401 errors for all users": "identity provider outage",
}
SERVICES = ("checkout", "payments", "search", "auth", "inventory", "email",
            "billing", "catalog", "ledger", "profile")
REGIONS = ("us-east", "us-west", "eu-central", "ap-south")
RANK_PROMPT = "Ranked causes:\n"


def _incident(rng: random.Random) -> tuple[str, str]:
  symptom = rng.choice(sorted(CAUSES))
  text = (f"Incident {rng.randint(1000, 9999)} in {rng.choice(SERVICES)} "
          f"({rng.choice(REGIONS)}) since {rng.randint(0, 23):02d}:"
          f"{rng.choice((0, 15, 30, 45)):02d}: {symptom}.\n")
  return text, CAUSES[symptom]


def _candidates(cause: str, rng: random.Random) -> list[str]:
  """The right cause and NUM_CANDIDATES - 1 others, in random order."""
  others = rng.sample([c for c in CAUSES.values() if c != cause],
                      NUM_CANDIDATES - 1)
  cands = [cause] + others
  rng.shuffle(cands)
  return cands


def build_inputs(root: str, seed: int = 0) -> str:
  """Data files and the random base model under `root`; returns the base.

  Stage 1 domain data are postmortems (incident -> "Root cause: X."), stage
  2 data are ranked lists (incident + RANK_PROMPT -> right cause first, then
  the other candidates); the held-out ranking lines are new incidents.
  """
  from sft_jax.demo import assets  # pylint: disable=g-import-not-at-top
  from sft_jax.demo import corpus  # pylint: disable=g-import-not-at-top
  files = _files(root)
  if os.path.exists(os.path.join(root, "base", "config.json")):
    return os.path.join(root, "base")
  os.makedirs(os.path.dirname(files["rank_eval"]), exist_ok=True)
  rng = random.Random(seed)

  def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")

  general_train, general_eval = corpus.make_splits(300, 20, max_chars=400,
                                                   seed=seed)
  write(files["general_train"], general_train)
  write(files["general_eval"], general_eval)
  postmortems = [_incident(rng) for _ in range(1500)]
  write(files["domain_pc"], ({"prompt": p, "completion": f"Root cause: {c}."}
                             for p, c in postmortems))
  ranked = []
  for _ in range(1500):
    p, c = _incident(rng)
    others = [x for x in _candidates(c, rng) if x != c]
    ranked.append({"prompt": p + RANK_PROMPT,
                   "completion": "\n".join([c] + others)})
  write(files["rank_train"], ranked)
  rank_eval = []
  for _ in range(64):
    p, c = _incident(rng)
    cands = _candidates(c, rng)
    rank_eval.append({"prompt": p + RANK_PROMPT, "candidates": cands,
                      "label": cands.index(c)})
  write(files["rank_eval"], rank_eval)
  size = assets.Size(
      general_train=300, general_eval=20, domain_train=0, domain_eval=0,
      vocab_size=1024, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128,
      seq_len=256, batch_size=8, cpt_steps=0, sft_steps=0, eval_every=0,
      max_new_tokens=0, max_chars=400, shares=())
  # The tokenizer is trained on the general text and the postmortems.
  text = files["domain_pc"].replace(".jsonl", "_text.jsonl")
  write(text, ({"text": f"{p}Root cause: {c}."} for p, c in postmortems))
  return assets.build_base_model(
      root, size, {"general_train": files["general_train"],
                   "domain_train": text}, seed)


def _ranking(model_dir: str, rank_eval: str) -> dict:
  from sft_jax import models, score  # pylint: disable=g-import-not-at-top
  from sft_jax.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  model_cfg, params = models.load_hf(model_dir, dtype="float32")
  requests = score.read_requests(rank_eval, load_tokenizer(model_dir))
  return score.ranking_metrics(list(score.score_requests(model_cfg, params,
                                                         requests)))


def _export(run_dir: str, out: str) -> None:
  from sft_jax.infer import export, loading  # pylint: disable=g-import-not-at-top
  loaded = loading.load(run_dir)
  export.export_merged(
      loaded.model_cfg, loaded.variables["params"],
      loaded.variables.get("lora"), out, tokenizer=loaded.tokenizer,
      tokenizer_files=loaded.tokenizer_files, base_model=loaded.base_model,
      dtype="float32")


def run(root: str, steps1: int = 0, steps2: int = 0) -> list[dict]:
  """Both stages at demo scale; returns the table's rows."""
  from sft_jax.train import loop  # pylint: disable=g-import-not-at-top
  base = build_inputs(root)
  files = _files(root)
  rows = [dict(stage="base (random init)", **_ranking(base, files["rank_eval"]),
               general_loss=None)]
  init = ""
  for stage, steps in ((1, steps1), (2, steps2)):
    arg = f"stage={stage},root={root},steps={steps}" + (
        f",init={init}" if init else "")
    cfg = get_config(arg)
    cfg.lock()
    run_dir = os.path.join(root, f"stage{stage}")
    result = loop.train(cfg, run_dir, progress=False)
    if result.exit_code:
      raise SystemExit(f"stage {stage} failed: {result.reason}")
    m = result.metrics
    rows.append(dict(
        stage=("1: mixed SFT (domain + general)" if stage == 1
               else "2: ranking SFT (right candidate first)"),
        top1=m["eval/rank/top1"], top5=m["eval/rank/top5"],
        mrr=m["eval/rank/mrr"], general_loss=m["eval/general/loss"],
        steps=cfg.train.steps))
    init = os.path.join(root, f"stage{stage}_hf")  # stage 2's base
    if stage == 1 and not os.path.exists(os.path.join(init, "config.json")):
      _export(run_dir, init)
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| after | top-1 | top-5 | MRR | general-data loss |",
           "|---|---|---|---|---|"]
  for r in rows:
    g = "—" if r["general_loss"] is None else f"{r['general_loss']:.3f}"
    lines.append(f"| {r['stage']} | {r['top1']:.3f} | {r['top5']:.3f} | "
                 f"{r['mrr']:.3f} | {g} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/two_stage")
  p.add_argument("--steps1", type=int, default=0,
                 help="stage-1 steps (default: the config's)")
  p.add_argument("--steps2", type=int, default=0,
                 help="stage-2 steps (default: the config's)")
  args = p.parse_args(argv)
  rows = run(args.workdir, args.steps1, args.steps2)
  table = markdown(rows)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
