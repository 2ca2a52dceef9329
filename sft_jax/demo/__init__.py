"""The embedded demo (`sft-jax demo`): see sft_jax/demo/cli.py."""

from sft_jax.demo.cli import main
