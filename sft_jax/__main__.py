"""`python -m sft_jax` is the same as the `sft-jax` console script."""

from sft_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.main())
