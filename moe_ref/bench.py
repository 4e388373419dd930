"""``python -m moe_ref.bench SUBCOMMAND``: the benchmarks of :mod:`moe_ref.book.bench` from the command line."""

from .book.bench import main

if __name__ == "__main__":
    main()
