"""CAUSE step 2: train the TR segmentation head with the concept-wise contrastive loss (docs/cause.md §4)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("front_door", "tr")
