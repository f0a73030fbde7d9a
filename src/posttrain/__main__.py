"""`python -m posttrain ...`: the CLI, also what torchrun launches (`torchrun --nproc-per-node N -m posttrain train
RECIPE`)."""
import sys

from .cli import main

sys.exit(main())
