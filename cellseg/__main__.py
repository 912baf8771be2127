"""`python -m cellseg` (also what `torchrun -m cellseg` runs)."""

from cellseg.cli import main

if __name__ == "__main__":
    main()
