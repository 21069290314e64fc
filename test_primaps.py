"""PriMaPs-EM: evaluate θ_M and θ_R, with and without CRF (docs/primaps.md §3)."""
from utils.cli.steps import main

if __name__ == "__main__":
    main("test_primaps")
