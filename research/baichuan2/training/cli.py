"""Finetune a Baichuan-family model on a MindRecord of token rows, on one process or many (msrun).

    python example/finetune.py --train_dataset data.mindrecord                     # one process
    cd example && bash msrun.sh "finetune.py --train_dataset /path/belle_512.mindrecord"   # data parallel

The recipe is a yaml file (--config, default configs/finetune_tiny.yaml); command-line flags override it, and
`--set section.key=value` (repeatable) sets any recipe key, typed as in the recipe's defaults:
    --set train.lr=2e-5 --set data.shuffle=false --set lora.targets=q_proj,v_proj
    --set model.overrides.param_dtype=float16
A model directory given as --load_checkpoint supplies the architecture (its config.json): the recipe's preset is then
not used and model.overrides may only change dtypes, model_max_length and the chat layout (a shape is an error).
MindSpore does the work: GRAPH mode, MindDataset, mindspore.train.Model with callbacks, AdamWeightDecay, and a
TrainOneStepWithLossScaleCell subclass that adds gradient accumulation, clipping and a grad-norm output.

Outputs under --output_dir:
    checkpoints/step_XXXXXX/   config.json + model.safetensors (as save_pretrained), optimizer.safetensors,
                               trainer_state.json (step, data position), manifest.json (size + sha256 of each
                               file); written to a temp dir, fsynced, then renamed
    model/                     the final weights as a servable model directory (export_model.py does the same
                               for any checkpoint)
    tensorboard/, train_log.jsonl, loss_curve.png
LoRA (recipe section `lora`, rank > 0, or --lora_rank): adapters on the target projections, base weights frozen;
checkpoints hold adapter_model.safetensors instead of model.safetensors, and the run ends with <output_dir>/adapter/
(merge it into the base with research/baichuan2/merge_lora.py). --load_adapter DIR continues an adapter (ours or
one trained with PEFT): its rank, alpha and targets apply, and the new adapter names --load_checkpoint as its base.
An --output_dir holding a previous run's checkpoints/, model/, adapter/ or train_log.jsonl stops the run (exit 2)
unless --resume continues that run or --overwrite replaces it (its outputs are removed once the new run's inputs are
checked). --resume checks the newest checkpoint against its manifest; a damaged one is reported (which file, why), renamed to
step_XXXXXX.damaged-N and the run resumes from the newest checkpoint that verifies (exit 2 if none does).
Set BAICHUAN_FINETUNE_DEBUG=1 to also write, per rank, the sample indices it trained on, its pid and its final
weights under debug/ (used by the tests to check data sharding and rank agreement); with it,
BAICHUAN_FINETUNE_PAUSE_IN_SAVE=<step> pauses that step's checkpoint save between files (tests kill it there).
The logic lives in research/baichuan2/training/ (imported as baichuan2.training); this file is the command line.

Installed as the command `baichuan2-finetune`; example/finetune.py is the same command line for a checkout.
"""
import argparse
import sys

from baichuan2.runtime import add_device_argument, setup_logs
from baichuan2.training import DEFAULT_CONFIG, FinetuneError, apply_overrides, load_recipe, resolve_config_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="yaml recipe (default configs/finetune_tiny.yaml)")
    p.add_argument("--train_dataset", help="MindRecord file (rows of seq_length+1 int32 input_ids/labels)")
    p.add_argument("--load_checkpoint", help="model dir or .safetensors to start from (convert_weight.py output)")
    p.add_argument("--output_dir")
    p.add_argument("--max_steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch_size", type=int, help="rows per device per micro-batch")
    p.add_argument("--seed", type=int)
    p.add_argument("--save_steps", type=int)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that verifies (damaged newer ones are moved aside)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's checkpoints/, model/, adapter/ and train_log.jsonl in --output_dir "
                        "(without it or --resume, finding them stops the run)")
    p.add_argument("--lora_rank", type=int, help="LoRA rank (> 0 turns LoRA on, 0 = full finetuning)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha (the update is scaled by alpha / rank)")
    p.add_argument("--lora_dropout", type=float, help="dropout on the adapter input")
    p.add_argument("--lora_targets", help="comma-separated projections, e.g. W_pack or q_proj,v_proj,o_proj")
    p.add_argument("--load_adapter", help="LoRA adapter directory to continue training (ours or PEFT's)")
    p.add_argument("--seq_length", type=int, help="tokens per row (as belle_preprocess.py --seq_length made them)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="set any recipe key, e.g. --set train.warmup_ratio=0.03 (repeatable)")
    add_device_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logs()  # before anything imports mindformers (its log folder, its INFO lines)
    from baichuan2.training.run import run  # pylint: disable=import-outside-toplevel
    try:
        recipe = apply_overrides(load_recipe(resolve_config_path(args.config)), args)
        run(recipe, args.resume, args.device, args.threads, overwrite=args.overwrite)
    except FinetuneError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
