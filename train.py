"""Optimize every pair of a dataset: ``python train.py data=shapes run.name=NAME [trainer.devices=N]``.

Rerunning the same command resumes an interrupted run. ``python train.py --help`` lists the options.
"""

from peekaboo.app.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
