"""Optimize every pair of a dataset; rerunning the same command resumes an interrupted run.

``python train.py --help`` shows the usage and every option with the value it would run with.
"""

from peekaboo.app.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
