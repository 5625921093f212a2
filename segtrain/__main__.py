"""`python -m segtrain` (what torchrun launches) behaves like the `segtrain` command."""

from segtrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
