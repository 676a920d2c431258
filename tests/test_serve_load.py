"""`python -m mlx_openelm.bench.serve_load` refuses bad inputs in one line, before building a model."""

from __future__ import annotations

import pytest

from mlx_openelm.bench.serve_load import main


@pytest.mark.parametrize("args, message", [
    (["--preset", "tiny.json"], "unknown preset 'tiny.json'; choose one of 270M, 450M, 1_1B, 3B"),
    (["--preset", "270M", "--tokenizer", "{tmp}/none.model"], "{tmp}/none.model: not a SentencePiece model"),
])
def test_bad_preset_or_tokenizer_is_a_usage_error(tmp_path, tokenizer_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--tokenizer" not in argv:
        argv += ["--tokenizer", str(tokenizer_path)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"error: {message.format(tmp=tmp_path)}" in err.strip().splitlines()[-1]
