"""lm-evaluation-harness's model interface on mlx-openelm (the optional `eval` extra).

Importing this module imports lm_eval and registers `OpenELMLM` as the model "mlx-openelm", so
`lm_eval --model mlx-openelm --model_args pretrained=FOLDER` works once it is imported; the
`mlx-openelm eval --tasks` command passes an instance to `lm_eval.simple_evaluate` directly.
Scoring is `scoring.score_tokens` on lm-eval's own encoding (`TemplateLM._encode_pair` and its
empty-context rule, with BOS on every context as in Apple's runs).
"""

from __future__ import annotations

from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .requests import generate_until, loglikelihood_rolling
from .scoring import BatchSize, Progress, check_batch_size, check_empty_context, score_tokens

MODEL_NAME = "mlx-openelm"


@register_model(MODEL_NAME)
class OpenELMLM(TemplateLM):
    """An lm-eval LM over a loaded mlx-openelm `(model, tokenizer)`, or a folder/repo id (`pretrained`).

    `batch_size`: rows per forward or "auto"; `share_prefixes`: read shared contexts once;
    `empty_context`: "eos" (the lm-eval of Apple's paper runs) or "bos" (today's lm-eval).
    `progress(done, total)` is called as the log-likelihood requests of a run finish; `scored` and
    `truncated` count the requests scored, and those left-truncated to the model's context, so far.
    """

    def __init__(self, model=None, tokenizer=None, pretrained: Optional[str] = None, batch_size: BatchSize = "auto",
                 share_prefixes: bool = True, empty_context: str = "eos", dtype: Optional[str] = None,
                 adapter_path: Optional[str] = None, progress: Optional[Progress] = None, **_ignored):
        super().__init__()
        if model is None:
            from ..loading import load

            model, tokenizer = load(pretrained, dtype=dtype, adapter_path=adapter_path)
        self.model, self.tokenizer = model, tokenizer
        self.name = str(pretrained or getattr(tokenizer, "path", "mlx-openelm"))
        self.batch_size = check_batch_size(batch_size)
        self.share_prefixes = bool(share_prefixes) and str(share_prefixes).lower() != "false"
        self.empty_context = check_empty_context(empty_context)
        self.progress = progress
        self.truncated = 0
        self.scored = 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id if self.empty_context == "eos" else self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self.model.args.max_context_length

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self.progress is not None:
            self.progress(0, len(requests))
        scores = score_tokens(self.model, [(context, continuation) for _, context, continuation in requests],
                              batch_size=self.batch_size, share_prefixes=self.share_prefixes, progress=self.progress)
        self.truncated += scores.truncated
        self.scored += len(scores)
        results = [(float(logprob), bool(greedy)) for logprob, greedy in scores]
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        totals = loglikelihood_rolling(self.model, self.tokenizer, texts, self.empty_context, self.batch_size)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = generate_until(self.model, self.tokenizer, context, until + [self.tok_decode([self.eot_token_id])],
                                  max_gen_toks=gen_kwargs.get("max_gen_toks", 256))
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results
