"""The server's generation thread: owns the model's Engine (engine.py) and turns its token events into text events.

    worker = EngineWorker(engine, tokenizer)
    worker.submit(job)      # from the event loop; job.send(...) delivers ("delta", text, logprob entries),
                            # ("done", reason, tokens, logprob entries, prompt logprobs) or ("error", message)
                            # back to it; entries: (token, logprob, [(token, logprob)] most likely first) per
                            # generated token when the job asks logprobs, else None
    job.cancelled = True    # the client left: its sequence is aborted at the next step, its blocks freed

Every step of the engine runs all live requests together (continuous batching): a request submitted while others
decode joins at the next step; each has its own sampling options. Stop strings are matched on the text here
(RowText), which then ends the sequence in the engine.
"""
import bisect
import collections
import logging
import threading
import time

from .engine import RequestTooLarge
from .sampling import GenerationOptions

log = logging.getLogger("uvicorn.error")  # the server log


class RowText:
    """Turns one row's token ids into text pieces to send: holds back an incomplete multi-byte character (decoded
    as U+FFFD) and any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids, self.text, self.sent = [], "", 0

    def add(self, token):
        """Returns (piece to send, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            return self._take(min(hits)), True
        hold = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        return self._take(len(text) - hold), False

    def flush(self):
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(len(self.text))

    def _take(self, end):
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def options_of(job):
    """The engine's options for a server Job (temperature 0 = greedy)."""
    return GenerationOptions(max_new_tokens=job.max_tokens, do_sample=job.temperature > 0,
                             temperature=job.temperature or 1.0, top_p=job.top_p, top_k=job.top_k,
                             repetition_penalty=job.repetition_penalty, seed=job.seed,
                             stop_token_ids=tuple(job.stop_token_ids), eos_token_id=job.eos_token_id,
                             min_p=job.min_p, min_new_tokens=job.min_tokens, ignore_eos=job.ignore_eos,
                             presence_penalty=job.presence_penalty, frequency_penalty=job.frequency_penalty,
                             logprobs=job.logprobs, prompt_lookup_num_tokens=job.prompt_lookup_num_tokens)


class EngineWorker:
    """The thread that owns the model (see the module docstring)."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.pending = collections.deque()
        self.live = {}  # Sequence -> (Job, RowText)
        self.cond = threading.Condition()
        self.closed = False
        self.step_sizes = []  # sequences each step ran, for tests and logs
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.finished = collections.Counter()  # requests ended, by finish reason
        self.thread = threading.Thread(target=self._run, name="baichuan2-generation", daemon=True)
        self.thread.start()

    @property
    def busy(self):
        return self.engine.has_work()

    def waiting(self):
        """Requests not yet running: queued here or waiting in the engine for room in the pool."""
        return len(self.pending) + len(self.engine.waiting)

    def submit(self, job):
        with self.cond:
            self.pending.append(job)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def _take_pending(self):
        with self.cond:
            while not self.closed and not self.pending and not self.live:
                self.cond.wait()
            if self.closed:
                return None
            jobs = list(self.pending)
            self.pending.clear()
            return jobs

    def _run(self):
        while True:
            jobs = self._take_pending()
            if jobs is None:
                return
            for job in jobs:
                if job.cancelled:
                    continue
                try:
                    seq = self.engine.add(job.prompt, options_of(job), prompt_logprobs=job.prompt_logprobs)
                except (RequestTooLarge, ValueError) as exc:
                    job.send("error", str(exc))
                    continue
                self.live[seq] = (job, RowText(self.tokenizer, job.stops))
                job.entries = [] if job.logprobs is not None else None
            for seq, (job, _) in list(self.live.items()):
                if job.cancelled:
                    self.engine.abort(seq)
                    del self.live[seq]
                    self.finished["abort"] += 1
            if not self.live:
                continue
            try:
                events = self.engine.step()
                self.step_sizes.append(self.engine.last_step_sequences)
            except Exception as exc:  # pylint: disable=broad-except  # one failed step must not stop the server
                log.exception("generation step failed")
                for seq, (job, _) in list(self.live.items()):
                    self.engine.abort(seq)
                    job.send("error", f"generation failed: {type(exc).__name__}: {exc}")
                self.live.clear()
                continue
            for event in events:
                self._deliver(event)

    def _deliver(self, event):
        entry = self.live.get(event.seq)
        if entry is None:
            return
        job, text = entry
        if event.token is not None:
            now = time.monotonic()
            last = getattr(job, "last_token_at", None)
            if last is None:
                self.time_to_first_token.observe(now - (getattr(job, "submitted", 0.0) or now))
            else:
                self.inter_token_latency.observe(now - last)
            job.last_token_at = now
            if job.entries is not None:
                job.entries.append((event.token, event.logprob, event.top_logprobs))
            piece, hit = text.add(event.token)
            if piece:
                job.send("delta", piece, self._take_entries(job))
            if hit:
                self.engine.abort(event.seq)
                self._done(job, event.seq, "stop", text)
                return
        if event.finished:
            tail = text.flush()
            if tail:
                job.send("delta", tail, self._take_entries(job))
            self._done(job, event.seq, event.seq.finish_reason, text)

    @staticmethod
    def _take_entries(job):
        """The logprob entries of the tokens since the last delta (None when the job asks none)."""
        if job.entries is None:
            return None
        taken, job.entries = job.entries, []
        return taken

    def _done(self, job, seq, reason, text):
        del self.live[seq]
        self.finished[reason] += 1
        job.send("done", reason, len(text.ids), self._take_entries(job), seq.prompt_logprobs)


# ---------------------------------------------------------------------------------------------- /metrics
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A Prometheus histogram: counts per upper bound (cumulative when printed), their sum and count."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name, labels):
        total, out = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {total}"]
        return out


class Metrics:
    """GET /metrics in the Prometheus text format, with vLLM's metric names (so its dashboards read ours)."""

    def __init__(self, engine, worker, model_name):
        self.engine, self.worker = engine, worker
        self.labels = f'model_name="{model_name}"'

    def text(self):
        e, w, labels = self.engine, self.worker, self.labels
        pool = e.pool
        values = [
            ("vllm:num_requests_running", "gauge", "Requests in the running batch.", len(e.running)),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting to be admitted.", w.waiting()),
            ("vllm:kv_cache_usage_perc", "gauge", "Fraction of the key/value cache blocks in use (1 = full).",
             pool.in_use() / pool.capacity),
            ("vllm:prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
             e.prompt_tokens),
            ("vllm:generation_tokens_total", "counter", "Tokens generated.", e.generated_tokens),
            ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens taken from the prefix cache.",
             e.prefix_hit_tokens),
            ("vllm:spec_decode_num_draft_tokens_total", "counter", "Speculative tokens drafted (prompt lookup).",
             e.draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
             e.accepted_tokens),
            ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
             e.prefix_query_tokens),
        ]
        lines = []
        for name, kind, help_text, value in values:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
        lines += ["# HELP vllm:request_success_total Requests finished, by reason.",
                  "# TYPE vllm:request_success_total counter"]
        for reason in ("stop", "length", "abort"):
            lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {w.finished[reason]}')
        for name, help_text, histogram in (
                ("vllm:time_to_first_token_seconds", "Time to first token.", w.time_to_first_token),
                ("vllm:inter_token_latency_seconds", "Time between a request's tokens.", w.inter_token_latency)):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"] + histogram.lines(name, labels)
        lines.append(f"# HELP baichuan2:kv_cache_blocks Key/value cache blocks of {e.block_size} tokens "
                     f"({e.kv_cache_dtype}).")
        lines.append("# TYPE baichuan2:kv_cache_blocks gauge")
        lines.append(f'baichuan2:kv_cache_blocks{{{labels},state="in_use"}} {pool.in_use()}')
        lines.append(f'baichuan2:kv_cache_blocks{{{labels},state="total"}} {pool.capacity}')
        return "\n".join(lines) + "\n"
