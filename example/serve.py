"""OpenAI-compatible HTTP server for a model directory, with a web chat page at /.

The command line lives in the package (baichuan2.serve_cli, installed as `baichuan2-serve`); see its --help.
"""
import sys

from baichuan2.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
