"""`mlx-openelm serve`: the OpenAI-compatible server on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli_common import (
    adapter_option,
    chat_template_option,
    load_model_and_tokenizer,
    model_options,
    sampling_options,
    sampling_settings,
    user_errors,
)
from ..speculative_cli import load_speculative, speculative_options
from .limits import ServerLimits

LIMITS = ServerLimits()


def bound_options(fn):
    """`serve`'s access rules and resource bounds (the bounds are `ServerLimits` fields, by name)."""
    options = [
        click.option("--allowed-hosts", multiple=True, metavar="NAMES",
                     help="Also answer requests whose Host header is one of these names or addresses "
                          "(comma-separated or repeated; '*': any Host, which lets DNS-rebinding pages in). "
                          "Always allowed: localhost, loopback addresses and the --host address."),
        click.option("--allowed-origins", multiple=True, metavar="ORIGINS",
                     help="Also answer (with CORS headers) web pages from these origins, e.g. "
                          "http://localhost:3000 or https://app.example (comma-separated or repeated; "
                          "'*': every web site the user opens may use the server). Always allowed: pages "
                          "served from loopback addresses."),
        click.option("--read-timeout", type=float, default=LIMITS.read_timeout, show_default=True,
                     help="Seconds a client has to send a request's line and headers, then its body; "
                          "also how long an idle kept-alive connection stays open."),
        click.option("--max-connections", type=int, default=LIMITS.max_connections, show_default=True,
                     help="Open connections at once (one thread each); more get 503 with Retry-After."),
        click.option("--max-requests", type=int, default=LIMITS.max_requests, show_default=True,
                     help="Generation requests queued or running at once; more get 503 with Retry-After."),
        click.option("--max-tokens-in-flight", type=int, default=LIMITS.max_tokens_in_flight, show_default=True,
                     help="Sum of the running requests' max_tokens (each within its context room); past it "
                          "503 with Retry-After, or 400 for a request over it alone."),
        click.option("--max-header-bytes", type=int, default=LIMITS.max_header_bytes, show_default=True,
                     help="Request line and headers, in bytes (256-65536); more get 414 or 431."),
        click.option("--max-headers", type=int, default=LIMITS.max_headers, show_default=True,
                     help="Header lines per request (1-100); more get 431."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

def _model_id(model_ref) -> str:
    """What /v1/models calls the model: a folder's name, or the repo id."""
    if model_ref is None:
        from ..hub import DEFAULT_MODEL

        return DEFAULT_MODEL.split("/")[-1]
    path = Path(model_ref)
    return path.resolve().name if path.exists() else model_ref.split("/")[-1]


@click.command("serve")
@model_options
@adapter_option
@chat_template_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but localhost is reachable from your network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--api-key", envvar="MLX_OPENELM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 requests (also $MLX_OPENELM_API_KEY).")
@click.option("--model-id", default=None, help="Model name in responses and /v1/models (default: the folder name).")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=4, show_default=True,
              help="KV caches of recent requests kept for prompts that extend them (0: off).")
@click.option("--prefill-chunk", type=int, default=256, show_default=True,
              help="Prompt tokens read per worker turn while other requests decode (0: a whole prompt at once).")
@sampling_options
@speculative_options(single_stream=False)
@bound_options
@click.option("--quiet", "-q", is_flag=True, help="No loading message and no per-request log lines.")
@user_errors
def serve_command(model_path, tokenizer_path, dtype, host, port, api_key, model_id, max_request_bytes,
                  prompt_cache_size, prefill_chunk, max_tokens, temp, top_k, top_p, min_p, repetition_penalty, seed,
                  draft_path, num_draft_tokens, prompt_lookup, allowed_hosts, allowed_origins, quiet, adapter_path,
                  chat_template, **limits):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).

    The sampling options are the defaults for requests that leave those fields out (left out
    here too: the model folder's generation_config.json). Chat messages go through the model's
    chat template (or --chat-template).
    Ctrl-C or SIGTERM stops the server: running requests are cancelled, exit status 0.
    """
    import logging

    from .access import AccessPolicy, parse_allowed_hosts, parse_allowed_origins
    from .api import SamplingDefaults
    from ..batching import validate_prefill_chunk
    from ..sampling import validate_repetition_penalty, validate_sampling, validate_seed
    from ..signals import calling_on_signals
    from .server import ServerApp, exposure_warning, make_server, serve

    # the request defaults given here, refused before loading (NaN passes click's ranges); the folder's
    # generation_config.json fills the others (checked as it is read)
    validate_sampling(0.0 if temp is None else temp, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p,
                      min_p)
    validate_repetition_penalty(1.0 if repetition_penalty is None else repetition_penalty)
    validate_seed(seed)
    validate_prefill_chunk(prefill_chunk)
    access = AccessPolicy(host, parse_allowed_hosts(allowed_hosts), parse_allowed_origins(allowed_origins))
    bounds = ServerLimits(**limits)
    try:  # bind before loading, so a taken port fails at once
        httpd = make_server(None, host, port, bounds, access)
    except OSError as e:
        raise click.ClickException(f"--host/--port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    warning = exposure_warning(host, api_key)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    try:
        model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_path, dtype, quiet=quiet,
                                                    adapter_path=adapter_path, chat_template=chat_template)
        defaults = SamplingDefaults(**sampling_settings(model_path, max_tokens, temp, top_k, top_p,
                                                        repetition_penalty), min_p=min_p, seed=seed)
        speculative = load_speculative(draft_path, num_draft_tokens, prompt_lookup, dtype, quiet)
    except BaseException:
        httpd.server_close()
        raise
    httpd.app = app = ServerApp(model, tokenizer, model_id or _model_id(model_path), defaults=defaults,
                                api_key=api_key, max_request_bytes=max_request_bytes,
                                prompt_cache_size=prompt_cache_size, speculative=speculative,
                                prefill_chunk=prefill_chunk)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bound_host, bound_port = httpd.server_address[:2]
    bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host  # an IPv6 address in a URL
    click.echo(f"Serving {app.model_id} on http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", err=True)
    with calling_on_signals(app.stop):
        serve(httpd)
    click.echo("mlx-openelm serve: stopped", err=True)
