"""CAUSE step 1: learn the concept clusterbook (modular.npy) by modularity (docs/cause.md §3)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("mediator")
