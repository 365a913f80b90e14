"""Every cluster config in infra/ is read by the tool it is for, or by the closest check we can run here.

* ``ray up`` configs: Ray's own schema and defaults (what ``ray up`` runs before it
  touches a cloud), plus the set-up that installs webclip.
* KubeRay ``RayCluster`` / ``RayJob`` and Kubernetes ``Job`` / ``Service``: the fields each
  kind requires; credentials only from Secrets; the commands inside them parsed by the
  very parsers that will run them (torchrun's, the trainer's, each stage's config).
* The Slurm script: ``bash -n``, its ``#SBATCH`` lines, and a run with stand-in ``srun``
  and ``scontrol`` whose torchrun and trainer arguments are parsed for real.
* ``infra/ray/submit.py`` and the Makefile's choice between local and cluster runs.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from infra.ray import submit

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)
LITERAL_KEYS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"),
]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def project_dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def kind_of(doc: dict) -> str:
    if "apiVersion" in doc and "kind" in doc:
        return doc["kind"]
    if "provider" in doc and "cluster_name" in doc:
        return "ray-up"
    if "working_dir" in doc or "excludes" in doc:
        return "ray-runtime-env"
    return "unknown"


# -- generic: every YAML parses, is a known kind, holds no credentials ----------------------


def test_infra_has_the_configs_the_issue_asks_for():
    kinds = {kind_of(doc) for path in YAML_FILES for doc in documents(path)}
    assert {"ray-up", "ray-runtime-env", "RayCluster", "RayJob", "Job", "Service"} <= kinds
    assert (INFRA / "slurm" / "train.sbatch").is_file() and (INFRA / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses_and_is_a_known_kind(path):
    docs = documents(path)
    assert docs, f"{path}: empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document that is not a mapping"
        assert kind_of(doc) in CHECKS, f"{path}: unknown kind of config; add a check for it in {__file__}"


@pytest.mark.parametrize("path", [*YAML_FILES, INFRA / "slurm" / "train.sbatch", INFRA / "k8s" / "Dockerfile"],
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_no_credentials_are_written_into_infra(path):
    text = path.read_text()
    for pattern in LITERAL_KEYS:
        assert not pattern.search(text), f"{path}: looks like a credential; pass it in the environment"


def container_envs(doc: dict):
    """Every container env entry anywhere in a Kubernetes document (pod templates nest at any depth)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "containers" and isinstance(value, list):
                for container in value:
                    yield from container.get("env", []) or []
            else:
                yield from container_envs(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from container_envs(item)


def check_credentials_from_secrets(doc: dict) -> None:
    for entry in container_envs(doc):
        if SECRET_NAME.search(entry["name"]):
            assert "value" not in entry, f"{entry['name']}: a literal value; use valueFrom.secretKeyRef"
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{entry['name']}: not from a Secret"


# -- Ray: cluster launcher and runtime env -----------------------------------------------------


def check_ray_up(doc: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(doc))  # Ray's schema, defaults filled in: what `ray up` checks first
    setup = " ".join(doc["setup_commands"] + doc.get("head_setup_commands", []))
    assert "pip install" in setup and "webclip" in setup, "the set-up must install webclip (and its pins)"
    assert any(Path(os.path.expanduser(str(src))) == Path(".") for src in doc["file_mounts"].values()), \
        "this checkout must be synced to the nodes (file_mounts: {~/webclip: .})"
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in doc["worker_start_ray_commands"])
    workers = [t for name, t in doc["available_node_types"].items() if name != doc["head_node_type"]]
    assert workers and all("InstanceType" in t["node_config"] for t in workers)


RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars", "container",
                    "image_uri", "config", "py_executable", "java_jars", "nsight", "mpi"}


def check_runtime_env(doc: dict) -> None:
    assert set(doc) <= RUNTIME_ENV_KEYS, f"not runtime env fields: {sorted(set(doc) - RUNTIME_ENV_KEYS)}"
    assert {".git", ".venv", "data/", "runs/"} <= set(doc["excludes"])
    for name in doc.get("env_vars", {}):
        assert not SECRET_NAME.search(name), f"{name}: a secret in a runtime env is shown on the dashboard"
    if "pip" in doc:
        packages = doc["pip"]["packages"] if isinstance(doc["pip"], dict) else doc["pip"]
        assert packages == project_dependencies(), (
            "the pip list differs from pyproject.toml's [project] dependencies: copy them over"
        )


# -- KubeRay and Kubernetes -------------------------------------------------------------------


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert container.get("name") and container.get("image"), f"{where}: a container needs name and image"
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec.get("rayVersion", ray.__version__) == ray.__version__, f"{where}: rayVersion != the pinned Ray"
    head = spec["headGroupSpec"]
    groups = [("head", head), *[(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]]
    assert len(groups) > 1, f"{where}: no workerGroupSpecs"
    for name, group in groups:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{where}/{name}: rayStartParams values are strings"
        for container in check_pod_template(group["template"], f"{where}/{name}"):
            assert ray.__version__ in container["image"], f"{where}/{name}: image of another Ray version"
        if name != "head":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", group.get("replicas", 0))
            assert low <= group.get("replicas", low) <= high, f"{where}/{name}: replicas outside min..max"


def check_ray_cluster(doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], doc["metadata"]["name"])
    check_credentials_from_secrets(doc)


def parse_stage_command(tokens: list[str]) -> None:
    """``python -m STAGE ARGS``: the stage's own config parser accepts ARGS."""
    assert tokens[:2] == ["python", "-m"], f"not a `python -m STAGE` command: {tokens}"
    stage, args = tokens[2], tokens[3:]
    config_class = getattr(importlib.import_module(f"{stage}.config"), f"{stage.capitalize()}Config")
    from core.config import parse_config

    try:
        parse_config(config_class, args, prog=stage, description="")
    except SystemExit as exc:
        pytest.fail(f"python -m {stage}: its parser refused {args} (exit {exc.code}; see the output above)")


def check_ray_job(doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "exactly one of rayClusterSpec, clusterSelector"
    if "rayClusterSpec" in spec:
        check_ray_cluster_spec(spec["rayClusterSpec"], doc["metadata"]["name"])
    else:
        assert spec["clusterSelector"].get("ray.io/cluster"), "clusterSelector names a RayCluster by ray.io/cluster"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    check_runtime_env({**runtime_env, "excludes": [".git", ".venv", "data/", "runs/"]})  # a zip: nothing to exclude
    assert runtime_env["working_dir"].endswith(".zip"), "a RayJob's code comes from a zip URI"
    for command in spec["entrypoint"].split("&&"):
        parse_stage_command(shlex.split(command))
    check_credentials_from_secrets(doc)


def parse_torchrun_and_train(argv: list[str]):
    """torchrun's own parser, then the trainer's: returns (torchrun args, train config)."""
    from torch.distributed.run import get_args_parser

    from core.config import load_cli
    from train.config import TrainConfig

    launcher = get_args_parser().parse_args(argv)
    assert launcher.module and launcher.training_script == "train", "torchrun must run `-m train`"
    assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint and launcher.rdzv_id != "none"
    assert launcher.max_restarts >= 1, "no restarts: a lost worker would end the job"
    config, _ = load_cli(TrainConfig, launcher.training_script_args, "python -m train", "")
    assert config.resume == "latest", "each start must resume (--resume latest)"
    assert config.checkpoint_dir.startswith("s3://"), "checkpoints must go to object storage"
    return launcher, config


def check_job(doc: dict, docs: list[dict]) -> None:
    assert doc["apiVersion"] == "batch/v1" and doc["metadata"]["name"]
    pod = doc["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure")
    (container,) = check_pod_template(pod, doc["metadata"]["name"])
    assert container["command"], "a training container needs a command"
    check_credentials_from_secrets(doc)
    if container["command"] == ["torchrun"]:
        launcher, _ = parse_torchrun_and_train(container["args"])
        assert doc["spec"]["completionMode"] == "Indexed"
        assert int(launcher.nnodes) == doc["spec"]["completions"] == doc["spec"]["parallelism"]
        # The rendezvous host is pod 0's stable name, which a headless Service selecting these pods provides.
        host = launcher.rdzv_endpoint.rsplit(":", 1)[0]
        subdomain = pod["spec"]["subdomain"]
        assert host == f"{doc['metadata']['name']}-0.{subdomain}"
        (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == subdomain]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1"


def check_service(doc: dict) -> None:
    assert doc["apiVersion"] == "v1" and doc["spec"]["selector"] and doc["spec"]["ports"]


CHECKS = {"ray-up": check_ray_up, "ray-runtime-env": check_runtime_env, "RayCluster": check_ray_cluster,
          "RayJob": check_ray_job, "Job": check_job, "Service": check_service}  # fmt: skip


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_has_what_its_tool_requires(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths in the configs are relative to the repo root, as in use
    docs = documents(path)
    for doc in docs:
        check = CHECKS[kind_of(doc)]
        check(doc, docs) if check is check_job else check(doc)


def test_the_dockerfile_copies_every_package_it_installs():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) ", (INFRA / "k8s" / "Dockerfile").read_text(), re.MULTILINE))
    assert {name.rstrip("*") for name in include} <= copied


# -- Slurm ----------------------------------------------------------------------------------


SBATCH = INFRA / "slurm" / "train.sbatch"


def test_sbatch_script_is_valid_bash_with_the_slurm_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", SBATCH.read_text(), re.MULTILINE))
    assert {"nodes", "ntasks-per-node", "gpus-per-node", "time", "requeue"} <= set(directives)
    assert directives["ntasks-per-node"] == "1", "one torchrun launcher per node"


def test_sbatch_script_launches_torchrun_across_nodes(tmp_path):
    """Run the script with stand-ins for srun and scontrol; parse what it hands to srun, for real."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (shims / "srun").write_text(
        "#!/bin/bash\n"
        'printf "%s\\n" "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > "$SRUN_CAPTURE"\n'
        'printf "%s\\0" "$@" >> "$SRUN_CAPTURE"\n'
    )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    capture = tmp_path / "srun.args"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SRUN_CAPTURE": str(capture),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_CPUS_PER_TASK": "64", "SLURM_GPUS_ON_NODE": "8", "CONFIG": "configs/demo/train.yaml",
           "CHECKPOINTS": "s3://bucket/runs/demo/checkpoints"}  # fmt: skip
    done = subprocess.run(["bash", str(SBATCH), "--set", "steps=10"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    share_store, rest = capture.read_text().split("\n", 1)
    argv = rest.rstrip("\0").split("\0")
    assert share_store == "1"
    assert argv[0] == "--kill-on-bad-exit=1" and argv[2:4] == ["-m", "torch.distributed.run"]
    launcher, config = parse_torchrun_and_train(argv[4:])
    assert launcher.nnodes == "2" and launcher.nproc_per_node == "8"
    assert launcher.rdzv_endpoint == "node-a:29500" and launcher.rdzv_id == "webclip-4242"
    assert config.checkpoint_dir == "s3://bucket/runs/demo/checkpoints" and config.steps == 10

    missing = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env={**env, "CHECKPOINTS": ""}, capture_output=True,
                             text=True, timeout=30, check=False)  # fmt: skip
    assert missing.returncode != 0 and "CHECKPOINTS" in missing.stderr


# -- submitting a stage to a cluster --------------------------------------------------------


def test_cluster_address_is_the_job_server_never_the_gcs():
    assert submit.cluster_address("http://head:8265/") == "http://head:8265"
    assert submit.cluster_address(None, {"RAY_API_SERVER_ADDRESS": "https://h:443"}) == "https://h:443"
    assert submit.cluster_address(None, {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265"
    assert submit.cluster_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) is None  # a driver joins it instead
    assert submit.cluster_address(None, {}) is None
    with pytest.raises(submit.SubmitError, match="job server"):
        submit.cluster_address("10.0.0.1:6379")


def test_entrypoint_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert submit.normalise_entrypoint([sys.executable, "-m", "ingest"]) == ("python", "-m", "ingest")
    with pytest.raises(submit.SubmitError, match="no command"):
        submit.normalise_entrypoint([])
    command, warnings = submit.check_entrypoint(("python", "-m", "ingest", "--config", "configs/demo/ingest.yaml",
                                                 "--output_folder", "s3://b/pool"))  # fmt: skip
    assert command[4] == "configs/demo/ingest.yaml"
    assert [w.split("=")[0] for w in warnings] == ["url_list", "output_folder"]  # the YAML's local paths
    outside = tmp_path / "my.yaml"
    outside.write_text("url_list: s3://b/urls\n")
    with pytest.raises(submit.SubmitError, match="inside it"):
        submit.check_entrypoint(("python", "-m", "ingest", "--config", str(outside)))
    with pytest.raises(submit.SubmitError, match="no such file"):
        submit.check_entrypoint(("python", "-m", "ingest", "--config=nope.yaml"))


def test_submission_declares_code_and_dependencies():
    env = submit.load_runtime_env(submit.RUNTIME_ENV)
    assert env["pip"]["packages"] == project_dependencies()
    assert "pip" not in submit.load_runtime_env(submit.RUNTIME_ENV, with_dependencies=False)
    command = submit.Submission("http://h:8265", ("python", "-m", "ingest"), env, submission_id="run-1").command()
    assert command[1:5] == ["job", "submit", "--address", "http://h:8265"]
    declared = json.loads(command[command.index("--runtime-env-json") + 1])
    assert declared["working_dir"] == str(REPO) and ".git" in declared["excludes"]
    assert command[command.index("--submission-id") + 1] == "run-1"
    assert command[command.index("--") + 1 :] == ["python", "-m", "ingest"]


def test_submit_cli_dry_run_and_errors(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.main(["--address", "http://h:8265", "--dry-run", "--no-pip", "--",
                        "python", "-m", "shards", "--config", "configs/demo/shards.yaml"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "+ " in err and "job submit --address http://h:8265" in err and "warning: pool=data/demo/pool" in err
    assert submit.main(["--dry-run", "--", "python", "-m", "ingest"]) == 2
    assert "no cluster" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        # issue 22: without CONFIG a stage target runs with the stage's own defaults, not the demo's config
        ({}, ".venv/bin/python -m ingest"),
        ({"CONFIG": "configs/demo/ingest.yaml"}, ".venv/bin/python -m ingest --config configs/demo/ingest.yaml"),
        ({"RAY_ADDRESS": "10.0.0.1:6379"}, ".venv/bin/python -m ingest"),
        ({"CLUSTER": "http://head:8265"},
         ".venv/bin/python -m infra.ray.submit --address http://head:8265 -- python -m ingest"),
        ({"RAY_ADDRESS": "http://head:8265"},
         ".venv/bin/python -m infra.ray.submit --address http://head:8265 -- python -m ingest"),
    ],
)
def test_make_ingest_runs_here_or_submits_to_the_cluster(variables, expected):
    # Under `make test` the parent make's MAKEFLAGS / MAKELEVEL would make this one print
    # "Entering/Leaving directory" lines: run it as a top-level make.
    dropped = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CLUSTER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    done = subprocess.run(["make", "--no-print-directory", "-n", "ingest", *[f"{k}={v}" for k, v in variables.items() if k == "CLUSTER"]],
                          cwd=REPO, env={**env, **{k: v for k, v in variables.items() if k != "CLUSTER"}},
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert " ".join(line.split()).startswith(expected), line
