"""PriMaPs-EM: pseudo masks, then class prototypes fitted to them (PRIMAPS.md; --mode cause|backbone)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("primaps")
