"""BELLE-format chat data -> MindRecord training rows for Baichuan2 (or XVERSE) finetuning.

    python example/dataset/belle_preprocess.py --input_glob 'data/*.json' --model_file dataset/tokenizer.model \
        --output_file out.mindrecord --seq_length 512 [--num_workers 2] [--strict] [--overwrite] \
        [--user_token '<reserved_106>'] [--assistant_token '<reserved_107>'] [--template baichuan2|xverse]

--model_file is a SentencePiece tokenizer.model (Baichuan families) or a Hugging Face tokenizer.json (XVERSE);
--template defaults from it: .json -> xverse, anything else -> baichuan2.

Input: every file matching --input_glob (sorted by name), each a JSON array or JSON Lines, read as a stream.
A record is {"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}
(an optional first {"from": "system"} turn is glued in front of the first user turn).
Output: one MindRecord shard (+ .db) with int32 columns input_ids and labels of shape [seq_length + 1], renamed
into place only when complete; identical bytes for any --num_workers. A bad record is skipped and counted
(--strict: stop, exit status 2, nothing written).

The work is done by the package baichuan2.data; the layout and labels of each template are documented in
baichuan2/data/labelling.py and defined in baichuan2/chat_format.py.
"""
import sys

from baichuan2.data import main

if __name__ == "__main__":
    sys.exit(main())
