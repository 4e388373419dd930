"""``python -m moe_ref.experiments NAME --out FILE``: run one of the book's experiments (see the package)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import EXPERIMENTS, ResultsError, run


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m moe_ref.experiments",
                                     description="Run one of the book's experiments and write its results file.")
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    parser.add_argument("--out", required=True, type=Path, help="the JSON results file to write")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--scale", type=float, default=float(os.environ.get("MOE_BOOK_SCALE", "1")),
                        help="multiplies the training steps (default: $MOE_BOOK_SCALE or 1)")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; the results depend on it)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m moe_ref.experiments", *argv])
    try:
        return run(args.name, args.out, seeds=args.seeds, scale=args.scale, arms=args.arms,
                   device=args.device, command=command)
    except (ResultsError, ValueError) as error:
        parser.exit(2, f"python -m moe_ref.experiments: error: {error}\n")


if __name__ == "__main__":
    main()
