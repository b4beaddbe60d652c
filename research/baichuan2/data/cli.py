"""Command line of example/dataset/belle_preprocess.py: flags, the summary it prints, its exit status: 0 when every
record was written, 2 on bad input (nothing written), 3 when the default lenient mode skipped records or
(--skip_bad_files) files: the output is written but lacks them."""
import argparse
import os
import sys

from ..chat_format import ASSISTANT_TOKEN, USER_TOKEN
from .errors import DataError
from .labelling import TEMPLATES
from .preprocess import preprocess
from .records import FORMAT_NAMES, FORMATS_HELP


SKIPPED_EXIT = 3  # written, but records (or files) were skipped: see the summary


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
    p.add_argument("--skip_bad_files", action="store_true",
                   help="leave out a file that cannot be read (not UTF-8, no permission) instead of stopping (exit 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--user_token", default=USER_TOKEN.piece, help="piece or id starting user turns (baichuan2)")
    p.add_argument("--assistant_token", default=ASSISTANT_TOKEN.piece,
                   help="piece or id starting assistant turns (baichuan2)")
    p.add_argument("--pack", action="store_true",
                   help="pack several whole conversations per row (adds column actual_seq_len; see data/packing.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except DataError as e:
        print(f"belle_preprocess: error: {e}", file=sys.stderr)
        return 2
    unread = f" ({len(stats['bad_files'])} not read: unreadable)" if stats["bad_files"] else ""
    print(f"files: {stats['files']}{unread}  records read: {stats['read']}  written: {stats['written']}  "
          f"skipped: {stats['skipped']} {stats['skipped_by_reason'] or ''}")
    print(f"rows truncated: {stats['truncated']}  tokens: {stats['tokens']}  "
          f"tokens with loss: {stats['loss_tokens']} ({stats['loss_fraction']:.1%})  seconds: {stats['seconds']:.1f}")
    if args.pack:
        print(f"packed: {stats['conversations']} conversations (rows before packing) -> {stats['written']} rows; "
              f"fill {stats['fill_unpacked']:.1%} -> {stats['fill']:.1%} (real tokens / token slots)")
    else:
        print(f"fill: {stats['fill']:.1%} of the token slots hold real tokens (--pack packs conversations)")
    print(f"wrote {os.path.abspath(args.output_file)} (+ .db), rows of {args.seq_length + 1} tokens")
    # the last line: what happened to each file's records
    files = [f"{path}: read {c['read']}, written {c['written']}, skipped {c['skipped']}"
             for path, c in stats["per_file"].items()]
    files += [f"{path}: not read (unreadable, --skip_bad_files)" for path in stats["bad_files"]]
    print("records per file: " + "; ".join(files))
    return SKIPPED_EXIT if stats["skipped"] or stats["bad_files"] else 0
