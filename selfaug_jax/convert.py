"""Command-line conversions.

Usage::

    python -m selfaug_jax.convert gguf-to-hf SRC.gguf DST_DIR [--dtype float32|bfloat16] [--overwrite]
    python -m selfaug_jax.convert default        # converts the embedded SmolLM2 once; prints its cached HF dir

Exit status 0 on success, 2 on bad input (missing file, unsupported GGUF, non-empty destination).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from selfaug_jax.checkpoints.default_model import ensure_default_model
from selfaug_jax.checkpoints.gguf import GGUFConversionError, GGUFConvertConfig, convert_gguf_to_hf


def build_parser() -> argparse.ArgumentParser:
    """The ``selfaug_jax.convert`` argument parser (sub-commands ``gguf-to-hf`` and ``default``)."""
    parser = argparse.ArgumentParser(prog="python -m selfaug_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g2h = sub.add_parser("gguf-to-hf", help="convert a llama-architecture GGUF file into a Hugging Face model dir")
    g2h.add_argument("src", help="path of the .gguf file")
    g2h.add_argument("dst", help="output directory (created; must not exist or be empty unless --overwrite)")
    g2h.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype on disk")
    g2h.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    sub.add_parser("default", help="convert the embedded SmolLM2-135M-Instruct (once) and print its HF dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "gguf-to-hf":
            t0 = time.perf_counter()
            out = convert_gguf_to_hf(args.src, args.dst, GGUFConvertConfig(dtype=args.dtype, overwrite=args.overwrite))
            print(f"wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            print(out)
        else:
            print(ensure_default_model())
    except (FileNotFoundError, FileExistsError, GGUFConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
