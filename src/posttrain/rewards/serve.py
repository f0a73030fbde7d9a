"""`python -m posttrain.rewards.serve RFD WFD`: the reward worker's entry point (see worker.py). A module of its
own, so that running it does not re-import the module that defines it."""
import sys

from posttrain.rewards.worker import main

if __name__ == "__main__":
    sys.exit(main())
