"""Few-shot multiple-choice evaluation of a model directory, as in the Baichuan model cards.

The command line lives in the package (baichuan2.evaluation.cli, installed as `baichuan2-eval`); see its --help.
"""
import sys

from baichuan2.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
