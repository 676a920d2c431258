"""How many prompt tokens a long chat re-reads once its context is full.

Runs N short turns (greedy, 32-token replies) through `ChatSession` on the tiny synthetic
model with a 2048-token context, once dropping only what is needed (`refit_fraction=1.0`,
the old policy) and once cutting to half the context (the default), and prints the
prompt tokens fed and the wall time of each:

    python scripts/measure_chat_rebuilds.py 300

Not part of the test suite (several minutes on a 2-core CPU).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mlx_openelm import load
from mlx_openelm.chat import ChatSession
from support import synthetic


def main(turns: int) -> None:
    folder = Path(tempfile.mkdtemp())
    tokenizer_path = synthetic.train_tokenizer(folder / "tokenizer.model")
    config = synthetic.TINY_CONFIG
    weights = synthetic.random_weights(config, seed=0)
    synthetic.write_hf_checkpoint(folder / "model", config, weights, tokenizer=tokenizer_path)
    model, tokenizer = load(folder / "model")
    for refit in (1.0, 0.5):
        session = ChatSession(model, tokenizer, system="Be brief.", refit_fraction=refit)
        fed, tic = 0, time.perf_counter()
        for n in range(turns):
            for _ in session.send(f"Tell me more {n}", max_tokens=32):
                pass
            fed += session.last_prefill_tokens
        print(f"refit_fraction={refit}: {turns} turns, {fed} prompt tokens fed, {time.perf_counter() - tic:.1f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
