"""Training code of the Baichuan-family finetune (recipe, parallel layout, steps, checkpoints)."""
