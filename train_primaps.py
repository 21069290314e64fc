"""PriMaPs-EM: pseudo masks, then class prototypes fitted to them (docs/primaps.md; --mode cause|backbone)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("primaps")
