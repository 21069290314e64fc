"""CAUSE step 2: train the MLP segmentation head with the concept-wise contrastive loss (SPEC §4)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("front_door", "mlp")
