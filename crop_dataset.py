"""Write the cropped training set of a dataset (docs/cause.md §2): the crops training reads."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("crop")
