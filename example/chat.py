"""Interactive terminal chat with a model directory, streaming the reply as it is generated.

The command line lives in the package (baichuan2.chat_cli, installed as `baichuan2-chat`); see its --help.
"""
import sys

from baichuan2.chat_cli import main

if __name__ == "__main__":
    sys.exit(main())
