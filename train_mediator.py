"""CAUSE step 1: learn the concept clusterbook (modular.npy) by modularity (SPEC §3)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("mediator")
