"""``partserve run`` (the embedded default: plan if needed, deploy on a local Ray, serve) and ``build``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import click

from partserve.cli.output import console, domain_errors, emit_json, err_console, parse_pairs, progress_bar
from serve_app.stop_signals import ignore_signals, stop_on_signals

if TYPE_CHECKING:
    from partitions.plan import Plan

DEFAULT_MODEL = "demo-transformer"
MIN_DEFAULT_STAGES, MAX_DEFAULT_STAGES = 2, 4


def stages_for_devices(devices: int) -> int:
    """Stages to cut a MODEL into when none is asked: one per device that runs a stage at once, from 2 (a
    pipeline) to 4. More stages than devices only add hops between processes that then take turns on the
    same device: on 2 CPU cores the demo transformer served 96-100 samples/s in 4 stages and 101-115 in 2,
    with an idle request's p50 at 44-45 ms and 34-40 ms (BENCHMARKS.md, "Stages per device")."""
    return max(MIN_DEFAULT_STAGES, min(MAX_DEFAULT_STAGES, devices))


def default_stages() -> int:
    """:func:`stages_for_devices` of this machine: its GPUs, or without CUDA its CPU cores (each stage
    replica runs one torch thread on CPU)."""
    import torch

    devices = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    return stages_for_devices(devices)


def cache_root() -> str:
    """``$PARTSERVE_CACHE`` or ``~/.cache/partserve``."""
    return os.environ.get("PARTSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "partserve")


def cache_dir() -> str:
    """Where ``run`` keeps the plans it makes."""
    return os.path.join(cache_root(), "plans")


def plan_key(spec: str, stages: int, batch_size: int, options: dict[str, Any] | None = None) -> str:
    """The cache key of a plan ``run`` makes: the model (for a directory, also its files' names, sizes and
    modification times, so a model saved again is planned again), the planning options and the plan
    schema version (a partserve that writes another version plans again)."""
    from partitions.plan import SCHEMA_VERSION

    files: list[tuple[str, int, int]] = []
    if os.path.isdir(spec):
        for root, _, names in os.walk(spec):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                files.append((os.path.relpath(os.path.join(root, name), spec), st.st_size, st.st_mtime_ns))
    parts = [spec, stages, batch_size, SCHEMA_VERSION, sorted(files), sorted((options or {}).items())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def resolve_plan(
    target: str | None,
    stages: int | None,
    batch_size: int,
    show_progress: bool,
    options: dict[str, Any] | None = None,
) -> str:
    """A plan URI for ``target``: a plan directory as given, else MODEL planned once (with model ``options``)
    into the cache, into ``stages`` stages (None: :func:`default_stages`)."""
    from partitions.errors import ArtifactError
    from partitions.partition import PlanOptions, build_plan
    from partitions.plan import PLAN_FILE
    from partitions.source import load_model
    from partitions.storage import read_file

    if target is not None:
        try:
            read_file(target, PLAN_FILE)
            return target
        except ArtifactError:
            pass  # not a plan directory: a MODEL spec
    spec = target or DEFAULT_MODEL
    stages = stages or default_stages()
    key = plan_key(spec, stages, batch_size, options)
    uri = os.path.join(cache_dir(), f"{os.path.basename(spec.rstrip('/')) or 'model'}-{key}")
    if os.path.exists(os.path.join(uri, PLAN_FILE)):
        return uri
    if show_progress:
        err_console.print(f"planning {spec} into {stages} stages (once; cached in {uri}) ...", highlight=False)
    import torch

    # Stage replicas on CPU run one torch thread each (Ray's default for num_cpus=0): profile the same way.
    threads = None if torch.cuda.is_available() else 1
    with progress_bar(show_progress) as progress:
        source = load_model(spec, dict(options or {}), batch_size)
        build_plan(source, uri, PlanOptions(stages=stages, threads=threads), progress)
    return uri


def _serve_config(
    plan_dir: str,
    plan_uri: str | None,
    host: str,
    port: int,
    *,
    gpus: bool,
    replica_cpus: float,
    min_replicas: int,
    max_replicas: int,
    autoscale: bool,
    gpu_budget: float | None,
    token_file: str | None,
) -> dict[str, Any]:
    """The Serve config for the scaling options ``run`` and ``build`` share, built from the plan in
    ``plan_dir`` and served from ``plan_uri`` (default ``plan_dir``)."""
    from cluster.deploy import serve_config

    return serve_config(
        plan_dir,
        plan_uri=plan_uri,
        host=host,
        port=port,
        autoscale=autoscale,
        gpu_budget=gpu_budget,
        gpus=gpus,
        num_cpus=replica_cpus,
        min_replicas=min_replicas,
        max_replicas=max(max_replicas, min_replicas, 1),
        auth_token_file=token_file,
    )


def curl_example(url: str, model: str, plan: Plan) -> str:
    """A one-sample request as a curl command: raw text where the plan tokenizes it (to the KServe v1 or
    OpenAI route its task has), else OIP JSON with zeros for the plan's inputs."""
    from partitions.dtypes import oip_datatype

    processing = plan.processing
    post = f"curl -s {url}/{{}} -H 'Content-Type: application/json' -d '{{}}'"
    if processing is not None and processing.tokenizer:
        if processing.task == "embedding":
            return post.format("v1/embeddings", json.dumps({"model": model, "input": ["a sentence to embed"]}))
        if processing.task == "classification":
            return post.format(f"v1/models/{model}:predict", json.dumps({"instances": ["a sentence to classify"]}))
        text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["some text"]}
        return post.format(f"v2/models/{model}/infer", json.dumps({"inputs": [text]}))
    tensors = []
    for spec in plan.inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        size = 1
        for d in shape:
            size *= d
        tensors.append({"name": spec.name, "shape": shape, "datatype": oip_datatype(spec.dtype), "data": [0] * size})
    body = json.dumps({"inputs": tensors}, separators=(",", ":"))
    return post.format(f"v2/models/{model}/infer", body)


RAY_LOGGERS = ("ray", "ray.serve")
"""Loggers of Ray and Serve in this process (records of their other processes stay in Ray's session logs)."""


def ray_logs_to_file(path: str) -> None:
    """Send this process's Ray and Serve log records to ``path``; the terminal keeps their warnings and
    errors only."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import ray  # noqa: F401  (sets up the "ray" logger and its terminal handler)

    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
        logger.addHandler(to_file)


scaling_options = [
    click.option("--gpus", is_flag=True, help="Reserve each stage's planned GPU share (fractional GPUs)."),
    click.option(
        "--replica-cpus",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="CPUs reserved per replica (0: replicas share the machine's cores).",
    ),
    click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True),
    click.option("--max-replicas", type=click.IntRange(min=1), default=2, show_default=True),
    click.option(
        "--autoscale/--no-autoscale",
        default=True,
        show_default=True,
        help="The coordinated pipeline autoscaling policy (cluster/serve_policy.py).",
    ),
    click.option("--gpu-budget", type=click.FloatRange(min=0), help="GPUs for all stage replicas together."),
    click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        help="Require this bearer token on HTTP (else $PARTSERVE_TOKEN in the replicas' environment).",
    ),
]


def with_scaling(fn):
    for option in reversed(scaling_options):
        fn = option(fn)
    return fn


@click.command()
@click.argument("target", required=False)
@click.option(
    "--stages",
    type=click.IntRange(min=1),
    help="Stages when planning MODEL (default: one per GPU, or per CPU core without CUDA; 2 to 4).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("-O", "--model-option", "model_opts", multiple=True, help="Model option KEY=VALUE when planning MODEL.")
@click.option("--address", help="Join this Ray cluster (e.g. auto or ray://host:10001) instead of starting one.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@with_scaling
@click.option("--json", "as_json", is_flag=True, help="Print the ready line as JSON.")
@click.option("--verbose", is_flag=True, help="Show Ray's and Serve's logs here too (else: in a file).")
@domain_errors
def run(
    target: str | None,
    stages: int | None,
    batch_size: int,
    model_opts: tuple[str, ...],
    address: str | None,
    host: str,
    port: int,
    as_json: bool,
    verbose: bool,
    **scaling: Any,
) -> None:
    """Serve TARGET (a plan directory, a MODEL planned once into a cache, such as a Hugging Face model
    directory; default: the demo transformer) on a local Ray, or the cluster at --address, until Ctrl-C or
    SIGTERM (also while planning or deploying; either stops what it started and exits with 0). Prints its
    progress and the ready line; Ray's and Serve's logs go to a file it names (--verbose: here too)."""
    stop_on_signals()
    from cluster import local
    from partitions.storage import read_plan
    from serve_app.app import default_model_name

    started = time.monotonic()
    names: list[str] | None = None
    say = (lambda text: None) if as_json else (lambda text: err_console.print(text, highlight=False))
    try:
        uri = resolve_plan(target, stages, batch_size, not as_json, parse_pairs(model_opts, "-O"))
        plan = read_plan(uri)
        for note in plan.model.get("notes", []):
            say(f"[yellow]note[/yellow]: {note}")
        if scaling["token_file"]:  # read by replicas on this machine
            scaling["token_file"] = os.path.abspath(scaling["token_file"])
        config = _serve_config(uri, None, host, port, **scaling)
        if not verbose:
            log_file = os.path.join(cache_root(), "logs", f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
            ray_logs_to_file(log_file)
        say(f"starting Ray and deploying {len(plan.stages)} stages of {plan.model['spec']} from {uri} ...")
        from serve_app.ray_internals import stop_signals_held

        with stop_signals_held():  # stopped inside ray.init, Ray's agents would outlive this process
            names = local.deploy_config(config, address, log_to_driver=verbose)
        if not verbose:
            from serve_app.ray_internals import session_dir

            say(f"logs: {log_file} (this process); {os.path.join(session_dir(), 'logs')} (Ray's and Serve's)")
        say("waiting for the replicas to load their stages ...")
        local.wait_running(names)
        url = f"http://{host}:{port}"
        local.wait_ready(url)
        model = default_model_name(plan)
        ready = {
            "url": url,
            "model": model,
            "stages": len(plan.stages),
            "plan": uri,
            "ready_after_s": round(time.monotonic() - started, 1),
            "curl": curl_example(url, model, plan),
        }
        if as_json:
            emit_json(ready)
        else:
            console.print(
                f"[green]ready[/green] in {ready['ready_after_s']} s: {model} ({len(plan.stages)} stages) "
                f"at {url}/v2/models/{model}; Ctrl-C stops. Try:",
                highlight=False,
            )
            console.print(ready["curl"], highlight=False, soft_wrap=True)
        while True:
            time.sleep(1)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: ray.init's own SIGTERM handler, while Ray starts
        pass
    finally:
        ignore_signals()
        err_console.print("stopping ...")
        local.stop((names or []) if address else None)  # never shut down a shared cluster's Serve


@click.command()
@click.argument("plan_dir")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="serve_config.yaml")
@click.option("--plan-uri", help="Where the cluster reads the plan (default: PLAN_DIR), e.g. s3://bucket/plan.")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@with_scaling
@click.option("--json", "as_json", is_flag=True, help="Print the config as JSON too.")
@domain_errors
def build(
    plan_dir: str,
    out: str,
    plan_uri: str | None,
    host: str,
    port: int,
    as_json: bool,
    **scaling: Any,
) -> None:
    """Write a Serve config for PLAN_DIR that `serve deploy` and `serve run` accept."""
    import yaml

    config = _serve_config(plan_dir, plan_uri, host, port, **scaling)  # plan_uri: as the cluster's nodes see it
    with open(out, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    if as_json:
        emit_json(config)
    else:
        app = config["applications"][0]
        console.print(
            f"wrote {out}: {len(app['deployments'])} deployments, "
            f"autoscaling {'coordinated' if scaling['autoscale'] else 'per deployment'}; "
            f"deploy with: serve deploy {out}",
            highlight=False,
        )
