"""`python -m sparsegrow ...` (and `torchrun ... -m sparsegrow train CONFIG`): the CLI entry point.

An entry point, not part of the library: the library itself never imports the experiments layer.
"""
import sys

from sparsegrow.experiments.cli import main

sys.exit(main())
