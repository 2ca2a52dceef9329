"""Per-device memory and collectives of a compiled step, for `sft-jax bench`.

`memory(compiled)` reads XLA's `memory_analysis()`; `collectives(hlo_text)`
parses the optimized HLO text. Counts are static: a collective inside a loop
body (the layer scan, the CE chunks) is counted once, not once per iteration,
and its bytes are one execution's output bytes per device.
"""

import re

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2,
                "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# "%name = <shape> <op>(" where op is a collective, its async start or a
# plain op; the shape may be a tuple "(f32[2,3]{1,0}, bf16[4]{0})".
_INSTR = re.compile(
    r"=\s*(?P<shape>\([^()]*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVE_KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes", "max_bytes"}} for each collective kind.

  bytes: output bytes per device summed over the instructions; max_bytes:
  the largest single array (XLA combines small reductions into one tuple
  instruction, so the largest array, not the tuple, says whether an
  activation-sized tensor crosses devices). An async "-start" of an all-gather or
  collective-permute returns (operands, results): only the results count.
  """
  stats = {k: {"count": 0, "bytes": 0, "max_bytes": 0}
           for k in COLLECTIVE_KINDS}
  for m in _INSTR.finditer(hlo_text):
    sizes = _array_bytes(m["shape"])
    if m["start"] and m["op"] in ("all-gather", "collective-permute"):
      sizes = sizes[len(sizes) // 2:]
    s = stats[m["op"]]
    s["count"] += 1
    s["bytes"] += sum(sizes)
    s["max_bytes"] = max([s["max_bytes"], *sizes])
  return stats


def memory(compiled) -> dict[str, int | None]:
  """Argument, output, temp, alias and generated-code bytes per device."""
  m = compiled.memory_analysis()
  get = lambda name: None if m is None else getattr(m, name, None)
  return {"argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"),
          "temp_bytes": get("temp_size_in_bytes"),
          "alias_bytes": get("alias_size_in_bytes"),
          "generated_code_bytes": get("generated_code_size_in_bytes")}
