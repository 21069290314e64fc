"""CAUSE step 3: fit the cluster probe on the TR head's features (SPEC §5)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("fine_tune", "tr")
