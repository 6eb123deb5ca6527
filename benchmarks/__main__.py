"""``python -m benchmarks``: every benchmark, each writing its own section of docs/benchmarks.md.

    python -m benchmarks            # distillation loop (benchmarks.run), compression, API throughput (needs wrk)
"""

from __future__ import annotations

import sys

from . import api_throughput, compression, run


def main() -> None:
    prog = sys.argv[0]
    for module in (run, compression, api_throughput):
        sys.argv = [prog]
        print(f"== {module.__name__}", flush=True)
        module.main()


if __name__ == "__main__":
    main()
