"""Evaluate a released STEGO or HP model: its own evaluation, and PriMaPs-EM's (docs/sota.md §1-§2)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("test_sota")
