"""Task accuracy: lm-eval's multiple-choice scoring on OpenELM, without lm-eval (`scoring`) or through it
(`lm_eval_backend`, the optional `eval` extra), the paper's task presets and published numbers (`tasks`),
and a quantized model's accuracy against its float reference (`compare`)."""

from .scoring import Scores, encode_pair, score, score_tokens

__all__ = ["Scores", "encode_pair", "score", "score_tokens"]
