"""Segment what a prompt names in one image.

``python predict.py --help`` shows the usage and every option with the value it would run with.
"""

from peekaboo.app.cli import predict_main

if __name__ == "__main__":
    raise SystemExit(predict_main())
