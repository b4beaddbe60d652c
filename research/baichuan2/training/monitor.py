"""What a run reports while it trains: the per-step callback and, at the end, the loss curve."""
import json
import math
import os
import sys
import time

from mindspore.train import Callback


class TrainMonitor(Callback):
    """Per optimizer step: logs (rank 0), TensorBoard, NaN stop, periodic checkpoints, debug sample log.

    `save(step)` is called on every rank; it writes the checkpoint of that step and returns its path (None on ranks
    that write nothing); `writer` is rank 0's SummaryWriter.
    After training, `failed` holds the message of a non-finite-loss stop, else None.
    """

    def __init__(self, *, rank, world_size, output_dir, plan, lrs, first_step, total_steps, tokens_per_step,
                 log_steps, save_steps, save, writer=None, debug_dir=None, steps_per_epoch=None):
        super().__init__()
        self.progress = Progress(total_steps, steps_per_epoch)
        self.rank, self.world_size, self.output_dir = rank, world_size, output_dir
        self.plan, self.lrs, self.first_step, self.total_steps = plan, lrs, first_step, total_steps
        self.tokens_per_step, self.log_steps, self.save_steps = tokens_per_step, log_steps, save_steps
        self.save, self.writer, self.debug_dir = save, writer, debug_dir
        self.last_time = time.time()
        self.failed = None
        self.step = first_step
        self.log_checked = False  # whether train_log.jsonl's end was checked (see _record)

    def on_train_step_end(self, run_context):
        outputs = run_context.original_args().net_outputs
        loss, norm, overflow, scale = (float(o.asnumpy()) for o in outputs)
        self.step += 1
        step = self.step
        now = time.time()
        elapsed, self.last_time = now - self.last_time, now
        self.progress.update(step, now)
        if self.debug_dir:
            with open(os.path.join(self.debug_dir, f"samples_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "indices": self.plan[step - 1 - self.first_step]}) + "\n")
        if not math.isfinite(loss):
            # Every rank sees the same all-reduced loss, so all stop together; no checkpoint is written.
            self.failed = (f"loss is {loss} at step {step}: stopping. The last good checkpoint is kept in "
                           f"{os.path.join(self.output_dir, 'checkpoints')}; lower the learning rate or "
                           f"check the data, then rerun with --resume")
            run_context.request_stop()
            return
        if self.rank == 0:
            self._log(step, loss, norm, overflow, scale, elapsed)
        if step % self.save_steps == 0 or step == self.total_steps:
            saved = self.save(step)  # every rank calls it: a sharded run's save is a collective
            if saved:
                print(f"saved checkpoint {saved}", flush=True)

    def _log(self, step, loss, norm, overflow, scale, elapsed):
        lr = self.lrs[min(step - 1, len(self.lrs) - 1)]
        tokens_per_s = self.tokens_per_step / max(elapsed, 1e-9)
        self._record(step, {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s,
                            "skipped": bool(overflow), "loss_scale": scale})
        if step % self.log_steps == 0 or step == self.total_steps:
            print(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
                  f"tokens/s {tokens_per_s:.0f} ({tokens_per_s / self.world_size:.0f} per device)"
                  + (" [skipped: non-finite gradients]" if overflow else "") + f" | {self.progress.describe(step)}",
                  flush=True)

    def _record(self, step, record):
        path = os.path.join(self.output_dir, "train_log.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            if not self.log_checked:  # the first record of this process: a torn last line stays a line of its own
                self.log_checked = True
                if f.tell() > 0 and not _ends_with_newline(path):
                    f.write("\n")
            f.write(json.dumps(record) + "\n")
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            self.writer.add_scalar(f"train/{name}", record[name], step)


class Progress:
    """Where a run stands: percent of all steps, epoch, and the time left at the pace of this process's steps so
    far (the first step, which includes graph compilation, is left out of the pace once there are others)."""

    def __init__(self, total_steps, steps_per_epoch=None):
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.start = self.latest = None  # (step, time it ended): this process's first step and its latest

    def update(self, step, now):
        self.latest = (step, now)
        if self.start is None:
            self.start = self.latest

    def eta_seconds(self, step):
        """Seconds until the last step, or None before two steps have ended (no pace yet)."""
        if step >= self.total_steps:
            return 0.0
        if self.latest is None or self.latest[0] <= self.start[0]:
            return None
        pace = (self.latest[1] - self.start[1]) / (self.latest[0] - self.start[0])
        return pace * (self.total_steps - step)

    def describe(self, step):
        """e.g. "42% epoch 2/3 ETA 0:01:05"."""
        parts = [f"{100.0 * step / max(self.total_steps, 1):.0f}%"]
        if self.steps_per_epoch:
            epochs = -(-self.total_steps // self.steps_per_epoch)
            parts.append(f"epoch {min((step - 1) // self.steps_per_epoch + 1, epochs)}/{epochs}")
        eta = self.eta_seconds(step)
        parts.append("ETA " + ("--" if eta is None else format_duration(eta)))
        return " ".join(parts)


def format_duration(seconds):
    """H:MM:SS (days as hours: 27:00:00)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_train_log(path):
    """The records of a train_log.jsonl. A line that does not parse (a write cut short: a full disk, a kill) is
    skipped and reported in one line on stderr, so the log of an interrupted run never stops a later one."""
    records, torn = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                torn.append(number)
                continue
            if isinstance(record, dict) and "step" in record and "loss" in record:
                records.append(record)
            else:
                torn.append(number)
    if torn:
        print(f"warning: {path}: skipped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
              f"{', ...' if len(torn) > 5 else ''}): a write cut short, e.g. by a full disk", file=sys.stderr,
              flush=True)
    return records


def write_loss_curve(output_dir):
    """loss_curve.png from train_log.jsonl (later lines win, so a resumed run overwrites replayed steps)."""
    # pylint: disable=import-outside-toplevel
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(output_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return None
    losses = {rec["step"]: rec["loss"] for rec in read_train_log(path)}
    if not losses:
        return None
    steps = sorted(losses)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [losses[s] for s in steps])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("finetune loss")
    ax.grid(alpha=0.3)
    out = os.path.join(output_dir, "loss_curve.png")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
