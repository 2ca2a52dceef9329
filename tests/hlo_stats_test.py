"""Memory and collectives of the compiled train step on 8 simulated devices.

The activation constraints are what keep FSDP from all-reducing activations:
without them the fsdp=8 step all-reduces [B, T, F] MLP activations and holds
more temp memory per device than plain data parallelism.
"""

import jax

from sft_jax.train import bench
from sft_jax.train import config as config_lib
from sft_jax.train import hlo_stats
from sft_jax.train import model_setup
from sft_jax.train import sharding
from sft_jax.train import step as step_lib

_FAST = {"xla_backend_optimization_level": 0}


def test_collectives_parse_tuples_async_pairs_and_byte_sizes():
  hlo = """
  %a = f32[16,64]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  %b = (f32[8]{0}, bf16[4,4]{1,0}, /*index=2*/f32[]) all-reduce(%p, %q, %r)
  %c = (f32[2,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%y), dimensions={0}
  %d = f32[16,8]{1,0} all-gather-done(%c)
  %e = bf16[3]{0} reduce-scatter(%z), dimensions={0}
  %f = s32[5]{0} add(%u, %v)
  """
  stats = hlo_stats.collectives(hlo)
  assert stats["all-reduce"] == {"count": 2, "bytes": 16 * 64 * 4 + 32 + 32
                                 + 4, "max_bytes": 16 * 64 * 4}
  assert stats["all-gather"] == {"count": 1, "bytes": 16 * 8 * 4,
                                 "max_bytes": 16 * 8 * 4}
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 6, "max_bytes": 6}
  assert stats["all-to-all"]["count"] == stats["collective-permute"][
      "count"] == 0


# The shape the memory claim was first measured on: a Llama with D 256,
# F 1024, 8 query / 4 kv heads, batch 16 x 128 tokens. (configs/tiny.py's
# D 64 x 64 tokens is so small that per-row buffers without a head axis,
# which tensor parallelism cannot split, weigh as much as the activations.)
_HF = ('{"model_type": "llama", "vocab_size": 512, "hidden_size": 256, '
       '"intermediate_size": 1024, "num_hidden_layers": 2, '
       '"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, '
       '"max_position_embeddings": 512, "rms_norm_eps": 1e-6, '
       '"tie_word_embeddings": false, "rope_theta": 10000.0}')


def _compiled_stats(mesh):
  d, f, t = mesh
  cfg = config_lib.load_config("configs/tiny.py", [
      f"--config.model.hf_config={_HF}", "--config.train.seq_len=128",
      "--config.train.ce_chunk=64",
      "--config.train.batch_size=16", f"--config.mesh.data={d}",
      f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}"])
  mesh = sharding.make_mesh(cfg.mesh)
  model_cfg, variables = model_setup.load_or_init_model(cfg, mesh)
  state, shardings = step_lib.init_train_state(cfg, model_cfg, variables,
                                               mesh)
  batch = sharding.global_batch(bench.synthetic_batch(
      16, cfg.train.seq_len, model_cfg.vocab_size), mesh)
  compiled = step_lib.jit_train_step(
      cfg, model_cfg, mesh, shardings, compiler_options=_FAST).lower(
          state, batch).compile()
  largest_param = max(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(variables))
  return (hlo_stats.memory(compiled), hlo_stats.collectives(
      compiled.as_text()), largest_param)


def test_sharded_meshes_reduce_gradients_not_activations():
  data_mem, _, _ = _compiled_stats((8, 1, 1))
  for mesh in ((1, 8, 1), (1, 4, 2), (2, 4, 1)):
    mem, coll, largest_param = _compiled_stats(mesh)
    # Largest activation: f32 [16, 128, 1024] MLP hidden = 8 MiB.
    assert coll["all-reduce"]["max_bytes"] <= largest_param, (mesh, coll)
    assert mem["temp_bytes"] <= data_mem["temp_bytes"], (mesh, mem, data_mem)
    assert coll["all-gather"]["count"] > 0  # FSDP gathers the weights

