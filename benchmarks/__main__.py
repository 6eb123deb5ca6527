"""``python -m benchmarks``: every benchmark, each writing its own section of docs/benchmarks.md.

    python -m benchmarks            # distillation loop (benchmarks.run), then compression
"""

from __future__ import annotations

import sys

from . import compression, run


def main() -> None:
    prog = sys.argv[0]
    for module in (run, compression):
        sys.argv = [prog]
        print(f"== {module.__name__}", flush=True)
        module.main()


if __name__ == "__main__":
    main()
