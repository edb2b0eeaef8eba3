"""``partserve build``, ``partserve k8s`` and ``partserve run`` write one application section: the one
:func:`cluster.deploy.app_section`, for the same scaling options, apart from what each documents that it adds.

The plan is read from PLAN_DIR only; ``--plan-uri`` is written into the config and never read (an
``s3://`` URI that no test machine can reach)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cluster.placement import GROUP_LABEL
from partitions import storage
from partserve.cli.k8s import k8s
from partserve.cli.serving import build, run
from tests.serve_fixtures import PlannedModel

URI = "s3://bucket/x"
SCALING = ["--min-replicas", "1", "--max-replicas", "3"]
CPUS = "0.5"
"""CPUs per replica: ``--replica-cpus`` of build and run, ``--num-cpus`` of k8s (whose defaults differ)."""


class Deployed(Exception):
    """Raised in place of deploying: ``run`` stops there, with the config it would deploy."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__("deploy")
        self.config = config


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every plan URI read or written through :mod:`partitions.storage` during the test."""
    seen: list[str] = []
    resolve = storage.resolve

    def spy(uri: str):
        seen.append(uri)
        assert not uri.startswith("s3://"), f"{uri} was read: the plan must come from PLAN_DIR"
        return resolve(uri)

    monkeypatch.setattr(storage, "resolve", spy)
    return seen


def invoke(command, args: list[str]) -> None:
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, (result.output, result.exception)


def built(plan_dir: str, out: Path, *options: str) -> dict[str, Any]:
    invoke(build, [plan_dir, "--plan-uri", URI, "-o", str(out), *SCALING, "--replica-cpus", CPUS, *options])
    return yaml.safe_load(out.read_text())["applications"][0]


def manifest_app(plan_dir: str, out: Path, *options: str) -> dict[str, Any]:
    invoke(k8s, [plan_dir, "--plan-uri", URI, "-o", str(out), *SCALING, "--num-cpus", CPUS, *options])
    manifest = yaml.safe_load(out.read_text())
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]


def run_app(plan_dir: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The application section ``partserve run PLAN_DIR`` deploys (it stops at the deploy)."""
    from cluster import local

    def deploy_config(config: dict[str, Any], address: str | None = None, **_: Any) -> list[str]:
        raise Deployed(config)

    monkeypatch.setattr(local, "deploy_config", deploy_config)
    result = CliRunner().invoke(run, [plan_dir, *SCALING, "--replica-cpus", CPUS, "--json"])
    assert isinstance(result.exception, Deployed), (result.output, result.exception)
    return result.exception.config["applications"][0]


def without_k8s_additions(app: dict[str, Any], gpus: bool) -> dict[str, Any]:
    """``app`` less what ``k8s`` documents that it adds to serve_config's section: ``runtime_env``, the
    co-location ``label_selector`` and, with ``gpus``, what ``gpus=True`` sets (``args.gpus``, the stages'
    ``num_gpus`` and the policy's ``gpu_fraction``)."""
    out = copy.deepcopy(app)
    out.pop("runtime_env", None)
    for d in out["deployments"]:
        d["ray_actor_options"].pop("label_selector", None)
        if gpus:
            d["ray_actor_options"].pop("num_gpus", None)
    if gpus:
        out["args"].pop("gpus", None)
        for stage in out["autoscaling_policy"]["policy_kwargs"]["stages"]:
            stage.pop("gpu_fraction")
    return out


def test_build_k8s_and_run_write_the_same_application(
    mlp: PlannedModel, reads: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_dir = mlp.uri
    stages = {f"stage-{s.index}": s for s in mlp.plan.stages}
    from_build = built(plan_dir, tmp_path / "f.yaml")
    from_build_gpus = built(plan_dir, tmp_path / "g.yaml", "--gpus")
    from_k8s = manifest_app(plan_dir, tmp_path / "m.yaml", "--colocate", "auto", "--pip", "torch==2.13.*")
    from_run = run_app(plan_dir, monkeypatch)

    assert from_build["args"]["plan_uri"] == from_k8s["args"]["plan_uri"] == URI
    assert from_run["args"]["plan_uri"] == plan_dir
    assert reads and set(reads) == {plan_dir}, reads

    # run: the section build writes, served from where the plan is.
    assert from_run == {**from_build, "args": {**from_build["args"], "plan_uri": plan_dir}}

    # k8s: build --gpus plus runtime_env and the co-location selectors ...
    assert without_k8s_additions(from_k8s, gpus=False) == from_build_gpus
    assert from_k8s["runtime_env"] == {"pip": ["torch==2.13.*"]}
    selectors = {d["name"]: d["ray_actor_options"].get("label_selector") for d in from_k8s["deployments"]}
    assert selectors.pop("entrance") is None
    assert set(selectors) == set(stages) and all(set(s) == {GROUP_LABEL} for s in selectors.values()), selectors
    # ... and build --gpus is build plus what gpus=True sets: each stage's planned share, in Serve and the policy.
    assert without_k8s_additions(from_build_gpus, gpus=True) == without_k8s_additions(from_build, gpus=True)
    assert from_k8s["args"]["gpus"] is True and "gpus" not in from_build["args"]
    for d in from_k8s["deployments"]:
        if d["name"] in stages:
            assert d["ray_actor_options"]["num_gpus"] == stages[d["name"]].gpu_fraction
    assert not any("num_gpus" in d["ray_actor_options"] for d in from_build["deployments"])
    policy = {s["name"]: s["gpu_fraction"] for s in from_k8s["autoscaling_policy"]["policy_kwargs"]["stages"]}
    assert policy == {name: s.gpu_fraction for name, s in stages.items()}
    assert {s["gpu_fraction"] for s in from_build["autoscaling_policy"]["policy_kwargs"]["stages"]} == {0.0}
