"""``partserve k8s``: write a KubeRay RayService for a plan (see :mod:`cluster.k8s` and docs/kubernetes.md)."""

from __future__ import annotations

import click

from partserve.cli.output import console, domain_errors, emit_json, parse_pairs, table


@click.command("k8s")
@click.argument("plan_dir")
@click.option("-o", "--output", default="-", show_default=True, help="Manifest file (- for stdout).")
@click.option("--plan-uri", help="Where the cluster reads the plan (s3://, gs://, hdfs://); default PLAN_DIR.")
@click.option("--name", default="partserve", show_default=True, help="RayService name.")
@click.option("--namespace", help="Kubernetes namespace (default: kubectl's).")
@click.option("--image", help="Ray image of every pod; default rayproject/ray:<this Ray>-py<this Python>-gpu.")
@click.option("--gpu-budget", type=click.IntRange(min=1), help="Most GPUs for all stage replicas together.")
@click.option(
    "--colocate",
    default="none",
    show_default=True,
    help="Co-location groups: none (one GPU worker group), auto (adjacent stages that share a GPU) or e.g. 0+1,2.",
)
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True, help="Per deployment.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True, help="Per deployment.")
@click.option("--num-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True, help="CPUs per replica.")
@click.option("-A", "--app-arg", "app_args", multiple=True, help="Further serve_config argument KEY=VALUE.")
@click.option("--working-dir", help="runtime_env working_dir: a zip of the partserve sources (s3://.../x.zip).")
@click.option("--pip", "pip", multiple=True, help="runtime_env pip requirement (repeatable), e.g. torch==2.13.*.")
@click.option("--env-secret", help="Secret whose keys become environment variables (object-store credentials).")
@click.option("--json", "as_json", is_flag=True, help="Print the worker groups as JSON instead of a table.")
@domain_errors
def k8s(
    plan_dir: str,
    output: str,
    plan_uri: str | None,
    name: str,
    namespace: str | None,
    image: str | None,
    gpu_budget: int | None,
    colocate: str,
    min_replicas: int,
    max_replicas: int,
    num_cpus: float,
    app_args: tuple[str, ...],
    working_dir: str | None,
    pip: tuple[str, ...],
    env_secret: str | None,
    as_json: bool,
) -> None:
    """Write a RayService (ray.io/v1) serving the plan in PLAN_DIR: the Serve config, a head that runs no
    replicas, GPU worker groups sized from the plan's GPU shares, autoscaling on."""
    from cluster.k8s import DEFAULT_IMAGE, ClusterOptions, dump, generate

    if as_json and output == "-":
        raise click.UsageError("--json prints to stdout: write the manifest with -o FILE")
    runtime_env = {k: v for k, v in {"working_dir": working_dir, "pip": list(pip)}.items() if v}
    options = ClusterOptions(
        name=name, namespace=namespace, image=image or DEFAULT_IMAGE, gpu_budget=gpu_budget, env_secret=env_secret
    )
    manifest, groups = generate(
        plan_dir,
        plan_uri,
        colocate=colocate,
        runtime_env=runtime_env or None,
        options=options,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        num_cpus=num_cpus,
        **parse_pairs(app_args, "--app-arg"),
    )
    text = dump(manifest)
    if output == "-":
        click.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)
    if as_json:
        emit_json({"output": output, "worker_groups": [g.__dict__ for g in groups]})
        return
    if output == "-":
        return
    rows = [
        [g.name, ",".join(g.deployments), g.gpus, g.cpus, f"{g.memory_gib}Gi", g.min_pods, g.max_pods] for g in groups
    ]
    console.print(table(f"worker groups of {name}", ["group", "runs", "GPU", "CPU", "memory", "min", "max"], rows))
    console.print(f"wrote {output}; kubectl apply -f {output}", highlight=False)
