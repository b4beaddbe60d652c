"""Command line of example/dataset/belle_preprocess.py: flags, the summary it prints, exit status 2 on bad input."""
import argparse
import os
import sys

from ..chat_format import ASSISTANT_TOKEN, USER_TOKEN
from .errors import DataError
from .labelling import TEMPLATES
from .preprocess import preprocess
from .records import FORMAT_NAMES, FORMATS_HELP


def parse_args(argv):
    p = argparse.ArgumentParser(description="Chat data (BELLE/ShareGPT, Alpaca, OpenAI messages) -> MindRecord "
                                             "rows for finetuning")
    p.add_argument("--input_glob", required=True, help="glob of .json (array) / .jsonl files, read in sorted order")
    p.add_argument("--model_file", required=True,
                   help="SentencePiece tokenizer.model, or tokenizer.json (Hugging Face tokenizers, XVERSE)")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="chat layout and labelling (default: xverse for a .json tokenizer, else baichuan2)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMAT_NAMES,
                   help=f"record format: {FORMATS_HELP}; auto: each file's from its first record")
    p.add_argument("--output_file", required=True, help="output .mindrecord (its .db index is written beside it)")
    p.add_argument("--seq_length", type=int, default=512, help="rows are seq_length + 1 tokens")
    p.add_argument("--num_workers", type=int, default=1, help="tokenisation processes (output does not change)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (exit code 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--user_token", default=USER_TOKEN.piece, help="piece or id starting user turns (baichuan2)")
    p.add_argument("--assistant_token", default=ASSISTANT_TOKEN.piece,
                   help="piece or id starting assistant turns (baichuan2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except DataError as e:
        print(f"belle_preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"files: {stats['files']}  records read: {stats['read']}  written: {stats['written']}  "
          f"skipped: {stats['skipped']} {stats['skipped_by_reason'] or ''}")
    print(f"rows truncated: {stats['truncated']}  tokens: {stats['tokens']}  "
          f"tokens with loss: {stats['loss_fraction']:.1%}  seconds: {stats['seconds']:.1f}")
    print(f"wrote {os.path.abspath(args.output_file)} (+ .db), rows of {args.seq_length + 1} tokens")
    return 0
