"""CAUSE step 3: fit the cluster probe on the MLP head's features (docs/cause.md §5)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("fine_tune", "mlp")
