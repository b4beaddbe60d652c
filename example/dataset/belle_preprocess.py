"""Chat data (BELLE/ShareGPT, Alpaca, OpenAI messages) -> MindRecord training rows for Baichuan2 (or XVERSE).

    python example/dataset/belle_preprocess.py --input_glob 'data/*.json' --model_file dataset/tokenizer.model \
        --output_file out.mindrecord --seq_length 512 [--format auto|belle|sharegpt|alpaca|messages] \
        [--num_workers 2] [--strict] [--skip_bad_files] [--overwrite] [--quiet] [--pack] \
        [--user_token '<reserved_106>'] [--assistant_token '<reserved_107>'] [--template baichuan2|xverse]

--model_file is a SentencePiece tokenizer.model (Baichuan families) or a Hugging Face tokenizer.json (XVERSE);
--template defaults from it: .json -> xverse, anything else -> baichuan2.

Input: every file matching --input_glob (sorted by name), each a JSON array or JSON Lines, read as a stream.
Record formats (baichuan2/data/records.py has the details), --format auto (default) picks each file's from its
first record, and stops (exit status 2, nothing written) when that record fits none:
    belle, sharegpt  {"conversations": [{"from": "human"|"user", "value": ...}, {"from": "gpt"|"assistant", ...}]}
                     (an optional first {"from": "system"} turn or a top-level "system")
    alpaca           {"instruction", "input", "output", "system", "history": [[q, a], ...]} (input, system and
                     history optional; the question is instruction + newline + input)
    messages         {"messages": [{"role": "system"|"user"|"assistant", "content": str or text parts}]}
All are labelled alike: system text laid out as in the model's chat template and never learned, user text masked,
answers and one eos per answer trained.
Output: one MindRecord shard (+ .db) with int32 columns input_ids and labels of shape [seq_length + 1], renamed
into place only when complete; identical bytes for any --num_workers. A bad record is skipped and counted
(--strict: stop, exit status 2, nothing written); a malformed one costs that record only (the reader resynchronises
at the next record). A file that is not UTF-8 stops the run naming it (exit 2) unless --skip_bad_files leaves it out.
The last line gives records read / written / skipped per file. Exit status: 0 when nothing was skipped, 3 when
records or files were (the output is written without them), 2 on bad input. On a terminal a progress bar counts
the input bytes read.
--pack: several whole conversations per row (first-fit-decreasing per block of 2048 conversations), labels unchanged,
plus an int32 column actual_seq_len [max(8, (seq_length + 1) // 32)] holding the cumulative conversation ends,
padded with seq_length + 1 (schema and worked example in baichuan2/data/packing.py). finetune.py detects the column
and keeps attention, positions and targets within each conversation. The summary prints rows before/after packing
and the fill ratio (real tokens / token slots).

The work is done by the package baichuan2.data; the layout and labels of each template are documented in
baichuan2/data/labelling.py and defined in baichuan2/chat_format.py.
"""
import sys

from baichuan2.data import main

if __name__ == "__main__":
    sys.exit(main())
