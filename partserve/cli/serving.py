"""``partserve run`` (the embedded default: plan if needed, deploy on a local Ray, serve) and ``build``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

import click

from partserve.cli.output import console, domain_errors, emit_json, err_console, progress_bar

DEFAULT_MODEL = "demo-transformer"
DEFAULT_STAGES = 4


def cache_dir() -> str:
    """Where ``run`` keeps the plans it makes: ``$PARTSERVE_CACHE`` or ``~/.cache/partserve``."""
    root = os.environ.get("PARTSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "partserve")
    return os.path.join(root, "plans")


def resolve_plan(target: str | None, stages: int, batch_size: int, show_progress: bool) -> str:
    """A plan URI for ``target``: a plan directory as given, else MODEL planned once into the cache."""
    from partitions.artifacts import read_file
    from partitions.errors import ArtifactError
    from partitions.partition import PlanOptions, build_plan
    from partitions.plan import PLAN_FILE
    from partitions.source import load_model

    if target is not None:
        try:
            read_file(target, PLAN_FILE)
            return target
        except ArtifactError:
            pass  # not a plan directory: a MODEL spec
    spec = target or DEFAULT_MODEL
    key = hashlib.sha256(json.dumps([spec, stages, batch_size, 1]).encode()).hexdigest()[:12]
    uri = os.path.join(cache_dir(), f"{os.path.basename(spec.rstrip('/')) or 'model'}-{key}")
    if os.path.exists(os.path.join(uri, PLAN_FILE)):
        return uri
    import torch

    # Stage replicas on CPU run one torch thread each (Ray's default for num_cpus=0): profile the same way.
    threads = None if torch.cuda.is_available() else 1
    with progress_bar(show_progress) as progress:
        build_plan(load_model(spec, {}, batch_size), uri, PlanOptions(stages=stages, threads=threads), progress)
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


def curl_example(url: str, model: str, inputs: list) -> str:
    """A one-sample OIP JSON request for the plan's inputs (zeros), as a curl command."""
    tensors = []
    for spec in inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        size = 1
        for d in shape:
            size *= d
        from partitions.dtypes import oip_datatype

        tensors.append({"name": spec.name, "shape": shape, "datatype": oip_datatype(spec.dtype), "data": [0] * size})
    body = json.dumps({"inputs": tensors}, separators=(",", ":"))
    return f"curl -s {url}/v2/models/{model}/infer -H 'Content-Type: application/json' -d '{body}'"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise ``KeyboardInterrupt`` here, whatever this process inherited: a
    background job of a shell script starts with SIGINT ignored, and ``ray.init`` installs its own SIGTERM
    handler (call this again after it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)


def ignore_signals() -> None:
    """While stopping: a second Ctrl-C must not cut the clean-up short and leave Ray processes behind."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
    default=DEFAULT_STAGES,
    show_default=True,
    help="Stages when planning MODEL.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--address", help="Join this Ray cluster (e.g. auto or ray://host:10001) instead of starting one.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@with_scaling
@click.option("--json", "as_json", is_flag=True, help="Print the ready line as JSON.")
@domain_errors
def run(
    target: str | None,
    stages: int,
    batch_size: int,
    address: str | None,
    host: str,
    port: int,
    as_json: bool,
    **scaling: Any,
) -> None:
    """Serve TARGET (a plan directory, or a MODEL planned once into a cache; default: the demo transformer)
    on a local Ray, or the cluster at --address, until Ctrl-C or SIGTERM (also while planning or deploying;
    either stops what it started and exits with 0)."""
    stop_on_signals()
    from cluster import local
    from partitions.artifacts import read_plan
    from serve_app.app import default_model_name

    started = time.monotonic()
    names: list[str] | None = None
    try:
        uri = resolve_plan(target, stages, batch_size, not as_json)
        plan = read_plan(uri)
        if scaling["token_file"]:  # read by replicas on this machine
            scaling["token_file"] = os.path.abspath(scaling["token_file"])
        config = _serve_config(uri, None, host, port, **scaling)
        if not as_json:
            err_console.print(f"deploying {len(plan.stages)} stages of {plan.model['spec']} from {uri} ...")
        names = local.deploy_config(config, address)
        stop_on_signals()
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
            "curl": curl_example(url, model, plan.inputs),
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
