"""Time the streaming detokenizer of a tokenizer file, checking its output against `decode`.

    python scripts/measure_detokenizers.py TOKENIZER [TOKENIZER ...] [--tokens 2048] [--seed 0]

Each TOKENIZER is a tokenizer.model or tokenizer.json (BOS/EOS: ids 1 and 2 where the file does
not name them). Feeds that many random ids (the special tokens excluded) one at a time, as
generation does, and prints the total and per-token time of the best of three runs.
"""

from __future__ import annotations

import argparse
import random
import time

from mlx_openelm.tokenizer import Tokenizer


def measure(path: str, tokens: int, seed: int) -> tuple[str, float]:
    tokenizer = Tokenizer(path, bos_id=1, eos_id=2)
    rng = random.Random(seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(tokens)]
    ids = [i for i in ids if tokenizer.piece_bytes(i)] or ids  # warms the byte table; drops control tokens
    best = float("inf")
    for _ in range(3):
        detokenizer = tokenizer.detokenizer()
        start = time.perf_counter()
        text = "".join([detokenizer.add_token(i) for i in ids] + [detokenizer.finalize()])
        best = min(best, time.perf_counter() - start)
        assert text == tokenizer.decode(ids), "streamed text differs from decode"
    return type(detokenizer).__name__, best / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizers", nargs="+")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'tokenizer':<60} {'detokenizer':<26} {'us/token':>9}")
    for path in args.tokenizers:
        kind, seconds = measure(path, args.tokens, args.seed)
        print(f"{path:<60} {kind:<26} {seconds * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
