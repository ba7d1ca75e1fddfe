"""``python -m peekaboo.bench.throughput``: run the benchmark and print its report (writes no file)."""

from peekaboo.bench.throughput import main

raise SystemExit(main())
