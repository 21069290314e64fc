"""CAUSE step 4: evaluate the TR head: mIoU and pixel accuracy with and without CRF (docs/cause.md §6)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("test", "tr")
