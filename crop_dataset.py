"""Write the cropped training set of a dataset (SPEC §2): the crops training reads."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("crop")
