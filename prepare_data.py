"""Make a data set's layout from the archives its authors publish, check it, then crop (docs/data.md)."""
from utils.cli.steps import guarded

if __name__ == "__main__":
    from utils.engine.prepare_data import main
    guarded("prepare_data", main)
