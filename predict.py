"""Segment what a prompt names in one image: ``python predict.py image=PATH prompt="a red circle"``.

Options are ``key=value`` overrides of the typed config (``python predict.py --help`` lists them).
"""

from peekaboo.app.cli import predict_main

if __name__ == "__main__":
    raise SystemExit(predict_main())
