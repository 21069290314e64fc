"""Segment your own images with a trained (or released) model: python predict.py --help."""
import sys

from utils.cli.steps import guarded

if __name__ == "__main__":
    from utils.engine.predict import main
    sys.exit(guarded("predict", main))
