"""The OpenAI-compatible server (installed as mlx_openelm.serve): `mlx-openelm serve`.

`server` (the HTTP handler, `ServerApp`, `make_server`, `serve`), `api` (OpenAI's request and
response shapes), `access` (Host/Origin/Content-Type checks), `limits` (read deadlines, header,
connection and in-flight bounds), `scheduler` (the one thread that runs MLX, the prompt cache),
`batching` (batched decoding: a left-padded KV cache, one model call per step), `cli` (`serve`).
Nothing is imported here, so the CLI's `--help` stays instant.
"""
