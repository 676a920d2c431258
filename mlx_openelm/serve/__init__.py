"""The OpenAI-compatible server (installed as mlx_openelm.serve): `mlx-openelm serve`.

`server` (the HTTP handler, `ServerApp`, `make_server`, `serve`), `api` (OpenAI's request and
response shapes), `access` (Host/Origin/Content-Type checks), `limits` (read deadlines, header,
connection and in-flight bounds), `scheduler` (the one thread that runs MLX: it admits requests
into the core's batched decoding, `mlx_openelm.batching`, and keeps finished ones in a
`mlx_openelm.cache.PromptCache`), `cli` (`serve`).
Nothing is imported here, so the CLI's `--help` stays instant.
"""
