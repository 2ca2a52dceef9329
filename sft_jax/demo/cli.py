"""`sft-jax demo`: the embedded end-to-end demo, built from scratch locally.

  1. build    data (real chat from the chitchat-dataset package; a generated
              JSON-extraction task), a BPE tokenizer and a random small Llama
              in HF format;
  2. cpt      continued pretraining on the general chat (sizes with
              cpt_steps > 0 only);
  3. sft      domain SFT swept over the share of general chat mixed in, each
              run evaluating its starting model first (eval.on_start);
  4. report   held-out exact match / JSON validity by greedy decoding and
              general-data loss, before vs after SFT, as a table, a PNG plot
              and TensorBoard scalars.

Every stage is skipped when its output exists, and an interrupted training run
resumes, so re-running the command continues where it stopped.
"""

import argparse
import os
import sys
import time

from sft_jax import sweep
from sft_jax.demo import assets
from sft_jax.demo import report

EXPERIMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "experiment.py")
SIZE_ENV = "SFT_JAX_DEMO_SIZE"

_DESCRIPTION = """\
The embedded demo: builds a small base model, its tokenizer and data locally
(no downloads beyond the Python packages), then

  SFT on a JSON-extraction task, with a share of real human chat
  (chitchat-dataset, MIT) mixed in, swept over that share (0, 0.25, 0.5),
  400 steps each, every run evaluated before its first update
  (eval.on_start) and every 100 steps,

and shows before vs after: on the held-out task, exact match and JSON
validity of the greedy answers and the answer loss / token accuracy; on
held-out general chat, the loss (what SFT does to general ability).
--parallel 3 trains the three points at once.

Outputs under WORKDIR:
  demo.png         the plot          results.md / results.json   the numbers
  cpt/  sft/<run>/ training runs (metrics.jsonl, tb/, checkpoints/)
  sft/summary.*    the sweep's table and plot
View everything in TensorBoard: tensorboard --logdir WORKDIR
"""


def _parser():
  p = argparse.ArgumentParser(
      prog="sft-jax demo", description=_DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/demo",
                 help="where everything is built and trained (default "
                      "runs/demo); re-running continues there")
  p.add_argument("--size", choices=sorted(assets.SIZES),
                 default=os.environ.get(SIZE_ENV, "full"),
                 help=f"full: the real demo; tiny: a seconds-long smoke run "
                      f"(default ${SIZE_ENV} or full)")
  p.add_argument("--parallel", type=int, default=1, metavar="N",
                 help="SFT sweep points trained at once (default 1; on 2 "
                      "cores parallel runs do not finish sooner)")
  return p


class _Clock:
  """Prints each stage with the time since the demo started."""

  def __init__(self):
    self.start = time.time()

  def __call__(self, text: str):
    print(f"[demo {time.time() - self.start:6.0f}s] {text}", flush=True)


def _export_cpt(root: str, out: str) -> None:
  """The continued-pretrained model in HF format: the SFT stage's base."""
  from sft_jax.infer import export  # pylint: disable=g-import-not-at-top
  from sft_jax.infer import loading  # pylint: disable=g-import-not-at-top
  loaded = loading.load(os.path.join(root, "cpt"))
  tmp = out + ".tmp"
  export.export_merged(
      loaded.model_cfg, loaded.variables["params"],
      loaded.variables.get("lora"), tmp, tokenizer=loaded.tokenizer,
      tokenizer_files=loaded.tokenizer_files, base_model=loaded.base_model,
      dtype="float32")
  os.replace(tmp, out)


def run(workdir: str, size_name: str, *, parallel: int = 1) -> int:
  """The whole demo; returns the exit code."""
  from sft_jax.demo import experiment  # pylint: disable=g-import-not-at-top
  size = assets.SIZES[size_name]
  root = os.path.abspath(workdir)
  if any(c in root for c in ",=:"):
    print(f"sft-jax demo: --workdir {root!r} must not contain ',', '=' or "
          "':' (they separate config knobs)", file=sys.stderr)
    return 2
  clock = _Clock()
  os.makedirs(root, exist_ok=True)

  clock(f"building data, tokenizer and base model in {root}")
  paths = assets.build_data(root, size)
  assets.build_base_model(root, size, paths)
  clock("built: " + ", ".join(
      f"{name} {sum(1 for _ in open(p))} records"
      for name, p in paths.items()))

  knobs = f"root={root},size={size_name}"
  if size.cpt_steps:
    cpt_spec = f"{EXPERIMENT}:{knobs},stage=cpt"
    clock(f"stage 1: continued pretraining on general chat "
          f"({size.cpt_steps} steps)")
    cpt = sweep.Point("cpt", {}, os.path.join(root, "cpt"))
    if sweep.run_points([cpt], cpt_spec, extra_args=["--no-progress"]).get(
        "cpt", 0) != 0:
      return 1
    cpt_hf = os.path.join(root, experiment.SFT_MODEL_DIR)
    if not os.path.exists(cpt_hf):
      _export_cpt(root, cpt_hf)

  sft_spec = f"{EXPERIMENT}:{knobs},stage=sft"
  clock(f"stage 2: domain SFT, general share swept over "
        f"{list(size.shares)} ({size.sft_steps} steps each)")
  rc = sweep.run_sweep(sft_spec, os.path.join(root, "sft"),
                       parallel=parallel, extra_args=["--no-progress"],
                       metrics=report.SWEEP_METRICS, x=report.SHARE_KEY)
  if rc != 0:
    return rc

  clock("stage 3: collecting before (step 0) and after SFT, greedy "
        "decoding on the held-out task")
  results = report.evaluate(root, sft_spec, size)
  files = report.write(root, results)
  clock("done")
  print()
  print(report.markdown(results))
  print(report.how_to_read(root, files))
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  return run(args.workdir, args.size, parallel=args.parallel)
