"""The server's generation worker: one thread owns MLX and serves every request in turn.

MLX arrays and streams are not meant to be used from many threads at once, so HTTP
threads never touch the model: they `submit` a `GenerationSpec` and read `Step`s
from the job's queue. A new job's prompt is read alone, `prefill_chunk` tokens a
turn, then it joins the `Batch` of decoding jobs (`mlx_openelm.batching`): each worker turn is
one model call that gives every active job its next token, so requests that arrive
together are served together and fairly, and a long prompt does not stall the others.
With speculative decoding (a draft model or prompt lookup) each job keeps its own
generator instead (its prompt read in its first turn) and the worker steps them
round-robin. Finished jobs leave their KV cache in a small `PromptCache` (`cache`), from which
a later prompt that shares a prefix (the next turn of a chat) starts instead of
re-reading it.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import mlx.core as mx

from ..batching import PREFILL_CHUNK, Batch, Row
from ..cache import KVCache, PromptCache, cached_length
from ..constrain.processor import make_constraint
from ..generation import GenerationResponse, stream_generate, stream_responses, wired_limit
from ..model import make_cache
from ..sampling import make_logits_processors, make_sampler
from ..speculative import SpeculativeOptions
from .api import GenerationSpec

log = logging.getLogger("mlx_openelm.server")


@dataclass
class Step:
    """One generated token as the HTTP side sees it (plain Python values only)."""

    text: str
    token: int
    logprob: Optional[float]
    top_logprobs: list[tuple[int, float]]
    finish_reason: Optional[str]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Failure:
    """A job that ended without finishing: `status` and `message` for the client."""

    status: int
    message: str


@dataclass
class Job:
    spec: GenerationSpec
    events: "queue.Queue[Step | Failure]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker-side state
    steps: Optional[Iterator[GenerationResponse]] = None
    cache: Optional[list[KVCache]] = None
    row: Optional[Row] = None  # the job's row while it decodes in the batch
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    drafted: int = 0  # speculative decoding's running totals (the last response's)
    accepted: int = 0

    def cancel(self) -> None:
        """Stop generating (the client went away); the worker notices before its next step."""
        self.cancelled.set()


class Scheduler:
    """Runs `GenerationSpec`s on one model; see the module docstring.

    `run` is the worker loop and must be called from the thread that owns MLX: the
    main thread (MLX 0.32 aborts at exit after model work on another thread,
    ml-explore/mlx#3126). `submit` and `stop` may be called from any thread; `stop`
    only sets a flag, so it is safe in a signal handler.
    """

    def __init__(self, model, tokenizer, prompt_cache_size: int = 4, speculative: Optional[SpeculativeOptions] = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.model = model
        self.tokenizer = tokenizer
        self.speculative = (speculative or SpeculativeOptions()).for_target(model)  # before serving, not per request
        self.draft_model = self.speculative.draft_model
        self.batch = None if self.speculative.enabled else Batch(model, prefill_chunk)
        self.prompt_cache = PromptCache(self._new_cache, prompt_cache_size)
        self.inbox: "queue.Queue[Job]" = queue.Queue()
        self.active: list[Job] = []
        self.stats = {"requests": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                      "generated_tokens": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      "largest_batch": 0}
        self._stopping = False  # a plain flag: set from signal handlers, where taking a lock could deadlock

    def _new_cache(self) -> list[KVCache]:
        """The target's layer caches, then the draft model's (they always hold the same tokens)."""
        cache = make_cache(self.model)
        return cache + make_cache(self.draft_model) if self.draft_model is not None else cache

    def submit(self, spec: GenerationSpec) -> Job:
        job = Job(spec)
        if self._stopping:
            job.events.put(Failure(503, "the server is shutting down"))
        else:
            self.inbox.put(job)
        return job

    def stop(self) -> None:
        """Make `run` return soon; running and queued jobs get a 503 failure."""
        self._stopping = True

    def snapshot(self) -> dict:
        return {**self.stats, "active": len(self.active), "queued": self.inbox.qsize(),
                "prompt_cache_entries": len(self.prompt_cache.entries)}

    # ---- worker ---------------------------------------------------------------------------

    def run(self, poll: float = 0.2) -> None:
        """Serve jobs until `stop`; `poll` is how often an idle worker looks at the stop flag."""
        # Held for the worker's life: the jobs' own (nested, interleaved) wired_limit
        # blocks then restore the same value, whatever order they close in.
        with wired_limit():
            try:
                while not self._stopping:
                    self._admit(timeout=None if self.active else poll)
                    self._step_batch()
                    for job in list(self.active):
                        if self._stopping:
                            break
                        self._step(job)
            finally:  # also when a signal handler raised (SIGHUP in the CLI)
                self._stopping = True
                for job in self.active + self._drain():
                    self._end(job, Failure(503, "the server is shutting down"))
                mx.synchronize()

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return jobs
            jobs.append(job)

    def _admit(self, timeout: Optional[float]) -> None:
        """Start the queued jobs; with none active, first wait up to `timeout` for one (None: no wait)."""
        try:
            first = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return
        for job in [first] + self._drain():
            self._start(job)

    def _start(self, job: Job) -> None:
        spec = job.spec
        try:
            job.cache, job.cached_tokens = self.prompt_cache.fetch(spec.prompt)
            processors = make_logits_processors(spec.repetition_penalty)
            if spec.constraint is not None:  # last: it sees the other processors' logits, masks them
                processors.append(make_constraint(self.tokenizer, spec=spec.constraint,
                                                  vocab_size=self.model.args.vocab_size))
            sampler = make_sampler(temp=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, min_p=spec.min_p,
                                   seed=spec.seed)
            job.steps = self._steps(job, sampler, processors)
        except ValueError as e:  # bad sampling values that parsing let through
            job.events.put(Failure(400, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - the batched path prefills here; one bad request must not stop the server
            self._fail(job, e)
            return
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(spec.prompt)
        self.stats["cached_prompt_tokens"] += job.cached_tokens
        self.active.append(job)

    def _steps(self, job: Job, sampler, processors) -> Iterator[GenerationResponse]:
        spec, new, cached = job.spec, job.spec.prompt[job.cached_tokens:], job.spec.prompt[:job.cached_tokens]
        if self.batch is not None:  # prefilled now, then its tokens come from the batch's steps
            job.row = self.batch.add(new, job.cache, sampler, processors, spec.max_tokens, cached)
            return stream_responses(job.row, self.tokenizer, len(new), spec.max_tokens, spec.stop)
        target_layers = self.model.args.num_transformer_layers
        draft_cache = job.cache[target_layers:] if self.draft_model is not None else None
        return stream_generate(self.model, self.tokenizer, new, max_tokens=spec.max_tokens, stop=spec.stop,
                               cache=job.cache[:target_layers], sampler=sampler, logits_processors=processors,
                               cached_ids=cached, speculative=self.speculative, draft_cache=draft_cache)

    def _step_batch(self) -> None:
        """One model call that readies the next token of every batched job (read by `_step`).

        A failure stays with the rows it belongs to (`batching`): their jobs fail when `_step`
        reads them, and the others go on.
        """
        if self.batch is None or not (self.batch.rows or self.batch.waiting):
            return
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.batch.rows))
        try:
            self.batch.step()
        except Exception as e:  # noqa: BLE001 - not one row's (a bug in the batch): its jobs fail, the server goes on
            for job in [j for j in self.active if j.row in self.batch.rows]:
                job.row.error = e
                self.batch.remove(job.row)  # its caches dropped unread
                self._fail(job, e)

    def _fail(self, job: Job, error: Exception) -> None:
        log.error("generation failed", exc_info=error)
        self.stats["failed"] += 1
        self._end(job, Failure(500, f"generation failed: {type(error).__name__}"))

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            self._end(job, None)
            return
        if job.row is not None and not job.row.ready:  # its prompt is still being read
            return
        try:
            response = next(job.steps, None)
            step = self._to_step(job, response)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
            self._fail(job, e)
            return
        job.events.put(step)
        if step.finish_reason:
            self._end(job, None)

    def _to_step(self, job: Job, response: Optional[GenerationResponse]) -> Step:
        spec = job.spec
        if response is None:  # no token fits (cannot happen for a prompt that passed validation)
            return Step("", -1, None, [], "length", len(spec.prompt), job.cached_tokens, len(job.generated))
        job.generated.append(response.token)
        self.stats["generated_tokens"] += 1
        self.stats["drafted_tokens"] += response.drafted_tokens - job.drafted
        self.stats["accepted_tokens"] += response.accepted_tokens - job.accepted
        job.drafted, job.accepted = response.drafted_tokens, response.accepted_tokens
        logprob, top = None, []
        if spec.top_logprobs is not None:
            logprob = response.logprobs[response.token].item()
            top = top_logprobs(response.logprobs, spec.top_logprobs)
        return Step(response.text, response.token, logprob, top, response.finish_reason, len(spec.prompt),
                    job.cached_tokens, len(job.generated))

    def _end(self, job: Job, failure: Optional[Failure]) -> None:
        if job in self.active:
            self.active.remove(job)
        if job.steps is not None:
            job.steps.close()
        if job.row is not None:
            if job.row in self.batch:  # decoding, or its prompt still being read
                job.cache = self.batch.remove(job.row)
            job.row = None
        if failure is not None:
            job.events.put(failure)
        if job.cache is not None and failure is None:
            # The cache holds the prompt and the generated tokens fed so far (generate_step
            # runs one token ahead, and never feeds a budget-ending token): key it by those.
            ids = (job.spec.prompt + job.generated)[:cached_length(job.cache)]
            self.prompt_cache.store(ids, job.cache)  # which drops positions past `ids`
        job.cache = job.steps = None


def top_logprobs(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of a (vocab,) log-probability row, most likely first."""
    if k <= 0:
        return []
    ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
    values = logprobs[ids]
    order = mx.argsort(-values)
    return list(zip(ids[order].tolist(), values[order].tolist()))

