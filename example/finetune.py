"""Finetune a Baichuan-family model on a MindRecord of token rows, on one process or many (msrun).

The command line lives in the package (baichuan2.training.cli, installed as `baichuan2-finetune`); see its --help.
"""
from baichuan2.training.cli import main

if __name__ == "__main__":
    main()
