"""PriMaPs-EM: evaluate θ_M and θ_R, with and without CRF (PRIMAPS.md §3)."""
from utils.runtime.cli import main

if __name__ == "__main__":
    main("test_primaps")
