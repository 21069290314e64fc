"""CAUSE step 4: evaluate the TR head: mIoU and pixel accuracy with and without CRF (SPEC §6)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("test", "tr")
