"""The cluster deployment: docker-compose.yml, its overrides in docker/, the Dockerfile and
.env.example. Static checks of what they promise (nothing reachable beyond 127.0.0.1, no default
secrets, Ray token auth, one shared storage path, GPU workers that scale, commands the image can
run, a torch build for a stated driver range, a C compiler for torch.compile, one classifier cache
for the cluster). Every check also runs on a copy broken the way it guards against, so a check
that could no longer fail would be caught too. `docker compose config` runs where the compose
plugin exists."""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
BASIC_AUTH_FILE = ROOT / "docker" / "mlflow-basic-auth.yml"
CPU_ONLY_FILE = ROOT / "docker" / "cpu-only.yml"
OVERRIDE_FILES = (BASIC_AUTH_FILE, CPU_ONLY_FILE)
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

LOOPBACK = "127.0.0.1"
SHARED_STORAGE = "/shared/ddpm_sweep_runs"  # the --storage-path the README's sweep command uses
PROJECT_IMAGE_SERVICES = ("mlflow", "ray-head", "ray-worker")
RAY_SERVICES = ("ray-head", "ray-worker")
CACHE_VAR = "DDPM_SWEEP_CACHE"  # lightning_modules.evaluation.classifier.CACHE_ENV_VAR
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
# NVIDIA's minimum Linux driver per CUDA major version (CUDA minor version compatibility): the
# Dockerfile states these, and its default torch build must be a CUDA 12 one.
DRIVER_MINIMUM = {"12": "525.60.13", "13": "580"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET")
# On python:3.11-slim besides what pip installs.
BASE_IMAGE_EXECUTABLES = {"python", "python3", "pip", "sh", "bash"}


# --- reading the files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tagged:
    """A compose merge tag (`!reset`, `!override`) and the value it wraps."""

    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: ComposeLoader, suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged("!" + suffix, value)


ComposeLoader.add_multi_constructor("!", _construct_tagged)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


_REF = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def references(text: str) -> list[tuple[str, str | None, str | None]]:
    """(name, operator, argument) of every `${...}` in a compose file; `$$` is the container's."""
    return [m.group("name", "op", "arg") for m in _REF.finditer(text.replace("$$", ""))]


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (`${V}`, `${V:-d}`, `${V-d}`, `${V:?e}`, `${V?e}`, `$$`)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        name, op, arg = m.group("name", "op", "arg")
        if op in (":?", "?") and (name not in env or (op == ":?" and not env[name])):
            raise KeyError(f"{name}: {arg}")
        if op == "-":
            return env.get(name, arg)
        return env.get(name) or (arg if op == ":-" else "")

    return _REF.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """The `VAR=value` settings of .env.example and its commented-out `# VAR=default` lines."""
    settings, documented = {}, {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            settings[m[1]] = m[2]
        elif m := re.fullmatch(r"#\s*([A-Z][A-Z0-9_]*)=(.*)", line):
            documented[m[1]] = m[2]
    return settings, documented


def sample_env() -> dict[str, str]:
    """.env.example's settings with a stand-in for each secret it (rightly) leaves empty."""
    settings, _ = env_example()
    return settings | {k: f"test-only-{k.lower()}" for k in settings if SECRET_NAME.search(k)}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return interpolate(load(COMPOSE_FILE), sample_env())


def services(config: dict) -> dict[str, dict]:
    return config.get("services") or {}


def mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume.get("source", ""), volume["target"]))
        else:
            source, _, rest = volume.partition(":")
            out.append((source, rest.split(":")[0]))
    return out


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


def named_volume_at(service: dict, target: str) -> str | None:
    return next((s for s, t in mounts(service) if t == target and is_named_volume(s)), None)


def flags(argv: list[str]) -> dict[str, str | None]:
    """`--name=value` and bare `--name` arguments (the compose file uses only these forms)."""
    return {a.partition("=")[0]: a.partition("=")[2] or None for a in argv if a.startswith("-")}


def healthcheck_argv(service: dict) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test") or []
    if isinstance(test, str):
        return shlex.split(test)
    if test[:1] == ["CMD-SHELL"]:
        return shlex.split(test[1])
    return test[1:] if test[:1] == ["CMD"] else test


# --- the checks: each returns the problems it finds ----------------------------------------


def port_problems(name: str, service: dict) -> list[str]:
    problems = []
    if service.get("network_mode") == "host":
        problems.append(f"{name}: network_mode host exposes every port on every interface")
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host_ip = port.get("host_ip")
        else:
            parts = str(port).split(":")
            host_ip = parts[0] if len(parts) == 3 else None
        if host_ip != LOOPBACK:
            problems.append(f"{name}: port {port!r} is not bound to {LOOPBACK}")
    return problems


def published_targets(service: dict) -> set[int]:
    return {
        int(p["target"] if isinstance(p, dict) else str(p).split(":")[-1].split("/")[0])
        for p in service.get("ports", [])
    }


def postgres_problems(config: dict) -> list[str]:
    pg = services(config)["postgres"]
    problems = port_problems("postgres", pg)
    if "ports" in pg:
        problems.append("postgres: publishes ports; only mlflow needs it, on the compose network")
    if not str(pg.get("image", "")).startswith("postgres:15"):
        problems.append(f"postgres: image {pg.get('image')!r}, expected the official postgres:15")
    if not named_volume_at(pg, "/var/lib/postgresql/data"):
        problems.append("postgres: its data directory is not a named volume")
    if " ".join(healthcheck_argv(pg)[:3]) != f"pg_isready -h {LOOPBACK}":
        problems.append("postgres: healthcheck is not `pg_isready -h 127.0.0.1 ...`")
    return problems


def secret_problems(text: str) -> list[str]:
    """Every secret is required (`${NAME:?message}`): no default, and empty counts as missing."""
    return [
        f"${{{name}{op or ''}{arg or ''}}}: a secret needs the form ${{{name}:?message}}"
        for name, op, arg in references(text)
        if SECRET_NAME.search(name) and (op != ":?" or not arg)
    ]


def mlflow_problems(config: dict) -> list[str]:
    svc = services(config)["mlflow"]
    problems = port_problems("mlflow", svc)
    if (svc.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("mlflow: does not wait for postgres to be service_healthy")
    if "/health" not in " ".join(healthcheck_argv(svc)):
        problems.append("mlflow: no healthcheck on /health")
    argv = [str(a) for a in svc.get("command", [])]
    opts = flags(argv)
    env = svc.get("environment") or {}
    store = opts.get("--backend-store-uri") or env.get("MLFLOW_BACKEND_STORE_URI") or ""
    if not (store.startswith("postgresql+psycopg2://") and "@postgres:5432/" in store):
        problems.append(f"mlflow: backend store {store!r} is not the postgres service")
    if any(SECRET_NAME.search(k) and v and v in " ".join(argv) for k, v in sample_env().items()):
        problems.append("mlflow: a secret is on the command line (visible in `ps` on the host)")
    destination = opts.get("--artifacts-destination")
    if "--serve-artifacts" not in opts or not destination:
        problems.append("mlflow: no --serve-artifacts with an --artifacts-destination")
    elif not named_volume_at(svc, destination):
        problems.append(f"mlflow: artifacts destination {destination} is not a named volume")
    hosts = (opts.get("--allowed-hosts") or "").split(",")
    if "mlflow:5000" not in hosts or not any(h.startswith(LOOPBACK) for h in hosts) or "*" in hosts:
        problems.append(f"mlflow: --allowed-hosts {hosts} (need mlflow:5000 and loopback, no *)")
    origins = (opts.get("--cors-allowed-origins") or "").split(",")
    if not origins[0] or "*" in origins:
        problems.append(f"mlflow: --cors-allowed-origins {origins} (need explicit origins)")
    if opts.get("--x-frame-options") not in ("SAMEORIGIN", "DENY"):
        problems.append("mlflow: --x-frame-options is not SAMEORIGIN or DENY")
    if "--disable-security-middleware" in opts:
        problems.append("mlflow: --disable-security-middleware")
    return problems


def ray_auth_problems(name: str, service: dict) -> list[str]:
    env = service.get("environment") or {}
    if env.get("RAY_AUTH_MODE") != "token" or not env.get("RAY_AUTH_TOKEN"):
        return [f"{name}: Ray token authentication is off (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)"]
    return []


def ray_head_problems(config: dict) -> list[str]:
    head = services(config)["ray-head"]
    problems = port_problems("ray-head", head) + ray_auth_problems("ray-head", head)
    targets = published_targets(head)
    if not {8265, 10001} <= targets:
        problems.append(f"ray-head: publishes {sorted(targets)}, expected the dashboard and client")
    if 6379 in targets:
        problems.append("ray-head: publishes the GCS port 6379; workers join on the network")
    opts = flags([str(a) for a in head.get("command", [])])
    if not {"--head", "--block"} <= opts.keys():
        problems.append("ray-head: command is not `ray start --head ... --block`")
    if not named_volume_at(head, SHARED_STORAGE):
        problems.append(f"ray-head: no named volume at {SHARED_STORAGE}")
    if not head.get("shm_size"):
        problems.append("ray-head: no shm_size for Ray's object store")
    if (head.get("environment") or {}).get("MLFLOW_TRACKING_URI") != "http://mlflow:5000":
        problems.append("ray-head: MLFLOW_TRACKING_URI is not http://mlflow:5000")
    return problems


def ray_worker_problems(config: dict) -> list[str]:
    worker, head = services(config)["ray-worker"], services(config)["ray-head"]
    problems = ray_auth_problems("ray-worker", worker)
    reservations = ((worker.get("deploy") or {}).get("resources") or {}).get("reservations")
    devices = (reservations or {}).get("devices") or []
    if not any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == "all" or (isinstance(d.get("count"), int) and d["count"] >= 1))
        for d in devices
    ):
        problems.append("ray-worker: no NVIDIA GPU reservation under deploy.resources")
    for key in ("container_name", "ports", "hostname"):
        if key in worker:
            problems.append(f"ray-worker: {key} stops `--scale ray-worker=N`")
    shared = named_volume_at(head, SHARED_STORAGE)
    if not shared or named_volume_at(worker, SHARED_STORAGE) != shared:
        problems.append(f"ray-worker: does not mount ray-head's volume at {SHARED_STORAGE}")
    argv = [str(a) for a in worker.get("command", [])]
    if argv[:2] != ["ray", "start"] or flags(argv).get("--address") != "ray-head:6379":
        problems.append("ray-worker: command is not `ray start --address=ray-head:6379`")
    if "ray-head" not in (worker.get("depends_on") or {}):
        problems.append("ray-worker: does not depend on ray-head")
    if worker.get("environment") != head.get("environment"):
        problems.append("ray-worker: environment differs from ray-head's")
    return problems


def volume_problems(config: dict, base: dict | None = None) -> list[str]:
    declared = set((base or {}).get("volumes") or {}) | set(config.get("volumes") or {})
    return [
        f"{name}: named volume {source!r} is not declared under top-level volumes"
        for name, svc in services(config).items()
        for source, _ in mounts(svc)
        if is_named_volume(source) and source not in declared
    ]


def env_example_problems(compose_texts: list[str]) -> list[str]:
    settings, documented = env_example()
    problems = []
    for name, op, arg in {r for text in compose_texts for r in references(text)}:
        if name not in settings and name not in documented:
            problems.append(f".env.example: ${{{name}}} is not listed")
        elif op == ":-" and name in documented and documented[name] != arg:
            problems.append(f".env.example: {name}={documented[name]}, compose's default is {arg}")
    for name, value in settings.items():
        if SECRET_NAME.search(name) and value:
            problems.append(f".env.example: {name} has a value; secrets stay empty there")
    return problems


def gitignored(path: str, gitignore: str) -> bool:
    """Whether a top-level file is ignored: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for line in gitignore.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#") or pattern.endswith("/"):
            continue  # a trailing slash matches directories only
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(path, pattern.lstrip("!").lstrip("/")):
            ignored = not negated
    return ignored


# --- the Dockerfile ------------------------------------------------------------------------


def dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (ln.strip().split(None, 1) for ln in joined.splitlines() if ln.strip())
    ]


def build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instr, rest in instructions:
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    return args


_INNERMOST = re.compile(r"\$\{(\w+)(?:(:[-+])([^${}]*))?\}")


def expand(command: str, variables: dict[str, str]) -> str:
    """The expansions the Dockerfile uses (`$V`, `${V}`, `${V:-word}`, `${V:+word}`, nested)."""

    def substitute(m: re.Match) -> str:
        value = variables.get(m[1], "")
        if m[2] == ":-":
            return value or m[3]
        if m[2] == ":+":
            return m[3] if value else ""
        return value

    while (expanded := _INNERMOST.sub(substitute, command)) != command:
        command = expanded
    return re.sub(r"\$(\w+)", lambda m: variables.get(m[1], ""), command)


def image_variables(
    instructions: list[tuple[str, str]], overrides: dict[str, str] | None = None
) -> dict[str, str]:
    """The build args (their defaults, or `--build-arg` `overrides`) and the ENV values."""
    variables: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "ARG":
            name, _, default = rest.partition("=")
            variables[name] = (overrides or {}).get(name, default.strip('"'))
        elif instr in ("ENV", "LABEL"):
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                variables[f"LABEL {name}" if instr == "LABEL" else name] = expand(value, variables)
    return variables


def pip_installs(
    instructions: list[tuple[str, str]], overrides: dict[str, str] | None = None
) -> list[tuple[int, str, list[str]]]:
    """(instruction index, the whole RUN, the `pip install` arguments) per pip install."""
    variables, out = image_variables(instructions, overrides), []
    for i, (instr, rest) in enumerate(instructions):
        if instr != "RUN":
            continue
        for step in expand(rest, variables).split("&&"):
            words = shlex.split(step)
            if words[:2] == ["pip", "install"]:
                out.append((i, rest, words[2:]))
    return out


def requirement_name(spec: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    return m[0].lower().replace("_", "-") if m else ""


def installed_distributions(instructions: list[tuple[str, str]]) -> set[str]:
    names = set()
    for _, run, words in pip_installs(instructions):
        it = iter(words)
        for word in it:
            if word in ("-r", "--requirement") and "pyproject.toml" in run:
                next(it)  # generated from pyproject.toml's dependencies
                names |= {
                    requirement_name(r)
                    for r in importlib.metadata.requires("ddpm-sweep") or []
                    if "extra ==" not in r
                }
            elif word in ("-r", "--requirement", "-i", "--index-url", "--extra-index-url"):
                next(it)
            elif word in (".", "./"):
                names.add("ddpm-sweep")
            elif not word.startswith("-"):
                names.add(requirement_name(word))
    return names


def image_executables(instructions: list[tuple[str, str]]) -> set[str]:
    scripts = set(BASE_IMAGE_EXECUTABLES)
    for dist in installed_distributions(instructions):
        try:
            eps = importlib.metadata.distribution(dist).entry_points
        except importlib.metadata.PackageNotFoundError:
            continue
        scripts |= {ep.name for ep in eps if ep.group == "console_scripts"}
    return scripts


def dockerfile_problems(text: str, pyproject: str) -> list[str]:
    instructions = dockerfile(text)
    problems = []
    if ("FROM", "python:3.11-slim") not in instructions:
        problems.append("Dockerfile: not FROM python:3.11-slim")
    args = build_args(instructions)
    if args.get("TORCH_SPEC") != "torch==2.13.0" or "TORCH_INDEX_URL" not in args:
        problems.append("Dockerfile: build args TORCH_SPEC=torch==2.13.0 and TORCH_INDEX_URL")
    installs = pip_installs(instructions)
    torch_at = [i for i, _, words in installs if any(w.startswith("torch==") for w in words)]
    package_at = [i for i, _, words in installs if {".", "./"} & set(words)]
    if not torch_at or not package_at or torch_at[0] > package_at[0]:
        problems.append("Dockerfile: torch is not installed before the package")
    if "psycopg2-binary" not in installed_distributions(instructions):
        problems.append("Dockerfile: psycopg2-binary is not pip installed")
    runtime = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)
    if runtime is None or "psycopg2" in runtime.group(1):  # the tests' dev extra may have it
        problems.append("pyproject.toml: psycopg2 belongs in the Dockerfile, not the package")
    ray = next((w for _, _, ws in installs for w in ws if requirement_name(w) == "ray"), "")
    extras = set(re.findall(r"\w+", ray.partition("[")[2].partition("]")[0]))
    if not {"default", "client"} <= extras:
        problems.append("Dockerfile: ray needs the default (dashboard) and client extras")
    users = [rest.split(":")[0] for instr, rest in instructions if instr == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile: the image runs as root")
    return problems


def executable_problems(config: dict, dockerfile_text: str) -> list[str]:
    instructions = dockerfile(dockerfile_text)
    available = image_executables(instructions)
    commands = {
        f"Dockerfile {instr}": json.loads(rest)
        for instr, rest in instructions
        if instr in ("CMD", "ENTRYPOINT")
    }
    for name in PROJECT_IMAGE_SERVICES:
        svc = services(config)[name]
        commands[f"{name} command"] = [str(a) for a in svc.get("command", [])]
        if "healthcheck" in svc:
            commands[f"{name} healthcheck"] = healthcheck_argv(svc)
    return [
        f"{where}: {argv[:1]} is not an executable the image has"
        for where, argv in commands.items()
        if not argv or argv[0] not in available
    ]


def torch_index(instructions: list[tuple[str, str]], overrides: dict[str, str]) -> str | None:
    """The index torch is installed from with these build args (None: PyPI); "" if it is not."""
    for _, _, words in pip_installs(instructions, overrides):
        if any(w.startswith("torch==") for w in words):
            for flag, value in zip(words, [*words[1:], None]):
                if flag in ("-i", "--index-url"):
                    return value
                if flag.startswith("--index-url="):
                    return flag.partition("=")[2]
            return None
    return ""


def torch_build_problems(text: str) -> list[str]:
    """The torch build is a build arg (TORCH_CUDA, a CUDA 12 one by default) that TORCH_INDEX_URL
    overrides, the image records it (ENV, LABEL), and the driver each CUDA line needs is stated."""
    instructions = dockerfile(text)
    args = build_args(instructions)
    missing = sorted({"TORCH_CUDA", "TORCH_SPEC", "TORCH_INDEX_URL"} - args.keys())
    if missing:
        return [f"Dockerfile: no build arg {name}" for name in missing]
    problems = []
    if not re.fullmatch(r"cu12\d", args["TORCH_CUDA"]):
        problems.append(
            f"Dockerfile: TORCH_CUDA={args['TORCH_CUDA']}, not a CUDA 12 build "
            f"(those run on drivers >= {DRIVER_MINIMUM['12']})"
        )
    mirror = "https://mirror.example/simple"
    cases = [
        ({}, PYTORCH_INDEX + args["TORCH_CUDA"]),
        ({"TORCH_CUDA": "cu126"}, PYTORCH_INDEX + "cu126"),
        ({"TORCH_CUDA": "cpu"}, PYTORCH_INDEX + "cpu"),
        ({"TORCH_INDEX_URL": mirror}, mirror),
    ]
    for overrides, expected in cases:
        given = " ".join(f"{k}={v}" for k, v in overrides.items()) or "the defaults"
        index = torch_index(instructions, overrides)
        if index != expected:
            source = "PyPI" if index is None else index or "no pip install of torch=="
            problems.append(f"Dockerfile: with {given}, torch comes from {source}")
        recorded = image_variables(instructions, overrides)
        for name in ("DDPM_SWEEP_TORCH_INDEX_URL", "LABEL ddpm-sweep.torch-index-url"):
            if recorded.get(name) != expected:
                problems.append(f"Dockerfile: with {given}, {name} is {recorded.get(name)!r}")
        for name in ("DDPM_SWEEP_TORCH_CUDA", "LABEL ddpm-sweep.torch-cuda"):
            if recorded.get(name) != recorded["TORCH_CUDA"]:
                problems.append(f"Dockerfile: with {given}, {name} is {recorded.get(name)!r}")
    spec = "torch==2.4.1"
    if not any(spec in words for _, _, words in pip_installs(instructions, {"TORCH_SPEC": spec})):
        problems.append("Dockerfile: the torch install ignores TORCH_SPEC")
    for major, minimum in DRIVER_MINIMUM.items():
        if f"(CUDA {major}.x): >= {minimum}" not in text:
            problems.append(f"Dockerfile: no comment `(CUDA {major}.x): >= {minimum}` (driver)")
    return problems


def c_compiler_problems(text: str) -> list[str]:
    """gcc and libc6-dev (Triton compiles with them at run time), installed as root, lean."""
    instructions = dockerfile(text)
    users = [i for i, (instr, _) in enumerate(instructions) if instr == "USER"]
    for i, (instr, rest) in enumerate(instructions):
        steps = [shlex.split(step) for step in rest.split("&&")] if instr == "RUN" else []
        install = next((s for s in steps if s[:2] == ["apt-get", "install"]), None)
        if install is None or not {"gcc", "libc6-dev"} <= set(install):
            continue
        problems = []
        if ["apt-get", "update"] not in steps:
            problems.append("Dockerfile: apt-get install without apt-get update in the same RUN")
        if "--no-install-recommends" not in install or not {"-y", "--yes"} & set(install):
            problems.append("Dockerfile: apt-get install without -y --no-install-recommends")
        if ["rm", "-rf", "/var/lib/apt/lists/*"] not in steps:
            problems.append(
                "Dockerfile: the apt lists stay in the layer (rm -rf /var/lib/apt/lists/*)"
            )
        if users and users[0] < i:
            problems.append("Dockerfile: apt-get install runs after USER (not as root)")
        return problems
    return ["Dockerfile: no C compiler (apt-get install gcc libc6-dev) for torch.compile"]


def cache_problems(config: dict) -> list[str]:
    """Every Ray service has DDPM_SWEEP_CACHE at one path of one named volume they all mount, not
    at a name a sweep's directory could take."""
    from orchestrator.sweep_config import NAME_PATTERN

    problems, where = [], set()
    for name in RAY_SERVICES:
        svc = services(config)[name]
        path = (svc.get("environment") or {}).get(CACHE_VAR)
        if not path or not path.startswith("/"):
            problems.append(f"{name}: {CACHE_VAR}={path!r} is not an absolute path")
            continue
        volume, target = next(
            (
                (s, t)
                for s, t in mounts(svc)
                if is_named_volume(s) and (path + "/").startswith(t + "/")
            ),
            (None, None),
        )
        if volume is None:
            problems.append(
                f"{name}: {CACHE_VAR}={path} is not on a named volume (one per container)"
            )
            continue
        where.add((volume, path))
        if target == SHARED_STORAGE:
            first = path[len(SHARED_STORAGE) + 1 :].split("/")[0]
            if not first or NAME_PATTERN.fullmatch(first):
                problems.append(
                    f"{name}: {CACHE_VAR}={path} is where a sweep named {first!r} lives"
                )
    if len(where) > 1:
        problems.append(
            f"Ray services keep the classifier cache in different places: {sorted(where)}"
        )
    return problems


# --- the tests -----------------------------------------------------------------------------


def broken(config: dict, service: str, edit=None, **changes) -> dict:
    """A copy of `config` with one service changed: keys replaced by `changes`, then `edit`."""
    copied = copy.deepcopy(config)
    services(copied)[service].update(changes)
    if edit is not None:
        edit(services(copied)[service])
    return copied


def test_postgres_is_private_and_healthchecked(cluster):
    assert postgres_problems(cluster) == []
    assert postgres_problems(broken(cluster, "postgres", ports=["5432:5432"]))
    assert postgres_problems(broken(cluster, "postgres", ports=["127.0.0.1:5432:5432"]))
    assert postgres_problems(broken(cluster, "postgres", volumes=["./pg:/var/lib/postgresql/data"]))
    assert postgres_problems(broken(cluster, "postgres", healthcheck={"test": "pg_isready"}))
    assert postgres_problems(broken(cluster, "postgres", image="postgres:latest"))


@pytest.mark.parametrize("path", [COMPOSE_FILE, *OVERRIDE_FILES], ids=lambda p: p.name)
def test_secrets_have_no_defaults(path):
    assert secret_problems(path.read_text()) == []


def test_secret_check_catches_defaults():
    assert secret_problems("${POSTGRES_PASSWORD:-postgres}")
    assert secret_problems("${RAY_AUTH_TOKEN}")
    assert secret_problems("${RAY_AUTH_TOKEN:?}")  # required, but without saying where to set it
    assert not secret_problems("${POSTGRES_USER:-mlflow} $${POSTGRES_PASSWORD}")


def test_secrets_are_required(cluster):
    raw = load(COMPOSE_FILE)
    for name in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"):
        with pytest.raises(KeyError, match=name):
            interpolate(raw, sample_env() | {name: ""})
    pg_env = services(cluster)["postgres"]["environment"]
    assert pg_env["POSTGRES_PASSWORD"] == sample_env()["POSTGRES_PASSWORD"]


def test_mlflow_server(cluster):
    assert mlflow_problems(cluster) == []
    command = services(cluster)["mlflow"]["command"]
    for flag in ("--serve-artifacts", "--allowed-hosts", "--cors-allowed-origins"):
        without = [a for a in command if not a.startswith(flag)]
        assert mlflow_problems(broken(cluster, "mlflow", command=without)), flag
    for extra in ("--allowed-hosts=*", "--cors-allowed-origins=*", "--disable-security-middleware"):
        assert mlflow_problems(broken(cluster, "mlflow", command=[*command, extra])), extra
    assert mlflow_problems(broken(cluster, "mlflow", ports=["5000:5000"]))
    assert mlflow_problems(broken(cluster, "mlflow", edit=lambda m: m.pop("depends_on")))
    assert mlflow_problems(broken(cluster, "mlflow", edit=lambda m: m.pop("healthcheck")))
    assert mlflow_problems(broken(cluster, "mlflow", volumes=["./art:/mlflow/artifacts"]))
    sqlite = {"MLFLOW_BACKEND_STORE_URI": "sqlite:///mlflow.db"}
    assert mlflow_problems(broken(cluster, "mlflow", environment=sqlite))


def test_mlflow_security_flags_are_the_one_list(cluster):
    """The compose defaults are what tests/services.py's MLflow servers run with."""
    from services import mlflow_security_options

    expected = mlflow_security_options(5000, ("mlflow", "localhost", "127.0.0.1"))
    pairs = dict(zip(expected[::2], expected[1::2]))
    opts = flags(services(cluster)["mlflow"]["command"])
    assert {flag: opts.get(flag) for flag in pairs} == pairs


def test_mlflow_backend_password_stays_off_the_command_line(cluster):
    mlflow = services(cluster)["mlflow"]
    uri = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert sample_env()["POSTGRES_PASSWORD"] in uri
    leak = broken(cluster, "mlflow", command=[*mlflow["command"], f"--backend-store-uri={uri}"])
    assert any("command line" in p for p in mlflow_problems(leak))


def test_ray_head(cluster):
    assert ray_head_problems(cluster) == []
    ports = services(cluster)["ray-head"]["ports"]
    assert ray_head_problems(broken(cluster, "ray-head", ports=[*ports, "127.0.0.1:6379:6379"]))
    assert ray_head_problems(broken(cluster, "ray-head", ports=["8265:8265", "10001:10001"]))
    assert ray_head_problems(broken(cluster, "ray-head", environment={"RAY_AUTH_MODE": "token"}))
    assert ray_head_problems(broken(cluster, "ray-head", volumes=[]))
    assert ray_head_problems(broken(cluster, "ray-head", edit=lambda h: h.pop("shm_size")))


def test_ray_workers_scale_with_gpus_and_share_storage(cluster):
    assert ray_worker_problems(cluster) == []
    assert ray_worker_problems(broken(cluster, "ray-worker", edit=lambda w: w.pop("deploy")))
    cpu_only = {"resources": {"reservations": {"devices": [{"capabilities": ["utility"]}]}}}
    assert ray_worker_problems(broken(cluster, "ray-worker", deploy=cpu_only))
    assert ray_worker_problems(broken(cluster, "ray-worker", container_name="worker"))
    assert ray_worker_problems(broken(cluster, "ray-worker", ports=["127.0.0.1:8000:8000"]))
    other_volume = ["other-volume:" + SHARED_STORAGE]
    assert ray_worker_problems(broken(cluster, "ray-worker", volumes=other_volume))
    assert ray_worker_problems(broken(cluster, "ray-worker", volumes=["sweep-runs:/tmp/runs"]))
    no_auth = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert ray_worker_problems(broken(cluster, "ray-worker", environment=no_auth))


def test_no_published_port_beyond_loopback(cluster):
    for name, svc in services(cluster).items():
        assert port_problems(name, svc) == []
    assert port_problems("x", {"ports": ["0.0.0.0:5000:5000"]})
    assert port_problems("x", {"ports": ["5000"]})
    assert port_problems("x", {"ports": [{"target": 5000, "published": 5000}]})
    assert port_problems("x", {"network_mode": "host"})
    assert not port_problems("x", {"ports": [{"target": 1, "published": 1, "host_ip": LOOPBACK}]})


def test_named_volumes_are_declared(cluster):
    assert volume_problems(cluster) == []
    for path in OVERRIDE_FILES:
        assert volume_problems(interpolate(load(path), sample_env()), cluster) == [], path.name
    undeclared = copy.deepcopy(cluster)
    undeclared["volumes"].pop("sweep-runs")
    assert volume_problems(undeclared)


def test_env_example_lists_every_variable_and_no_secret():
    texts = [p.read_text() for p in (COMPOSE_FILE, *OVERRIDE_FILES)]
    assert env_example_problems(texts) == []
    assert env_example_problems([*texts, "${SOMETHING_NEW:-1}"])
    assert env_example_problems([*texts, "${MLFLOW_PORT:-5001}"])  # default out of step
    settings, _ = env_example()
    assert {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"} <= settings.keys()


def test_gitignore_check():
    assert gitignored(".env", ".env\n") and gitignored(".env", "/.env\n")
    assert not gitignored(".env", "*.py\n") and not gitignored(".env", ".env/\n")
    assert gitignored(".env.example", ".env*\n")
    assert not gitignored(".env.example", ".env*\n!.env.example\n")


def test_env_file_is_gitignored_and_the_example_is_not():
    gitignore = (ROOT / ".gitignore").read_text()
    assert gitignored(".env", gitignore), ".gitignore must list .env (it holds the secrets)"
    assert not gitignored(".env.example", gitignore), ".env.example must stay committable"


def test_dockerfile():
    text, pyproject = DOCKERFILE.read_text(), (ROOT / "pyproject.toml").read_text()
    assert dockerfile_problems(text, pyproject) == []
    assert dockerfile_problems(text.replace("USER ddpm", "USER root"), pyproject)
    assert dockerfile_problems(text.replace("psycopg2-binary", "psycopg"), pyproject)
    assert dockerfile_problems(
        text, pyproject.replace("dependencies = [", 'dependencies = [\n    "psycopg2-binary",', 1)
    )
    assert dockerfile_problems(text.replace("ray[default,client,tune]", "ray[tune]"), pyproject)
    assert dockerfile_problems(text.replace("python:3.11-slim", "python:3.12"), pyproject)
    assert dockerfile_problems(text.replace('TORCH_SPEC="torch==2.13.0"', "TORCH_SPEC"), pyproject)


def test_torch_build_is_a_build_arg_for_a_stated_driver_range():
    text = DOCKERFILE.read_text()
    assert torch_build_problems(text) == []
    assert torch_build_problems(re.sub(r"ARG TORCH_CUDA=\S+", "ARG TORCH_CUDA=cu130", text))
    assert torch_build_problems(re.sub(r"ARG TORCH_CUDA=\S+", "ENV TORCH_CUDA=cu128", text))
    assert torch_build_problems(text.replace("--index-url ", "--extra-index-url "))
    effective = "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${TORCH_CUDA}}"
    assert torch_build_problems(text.replace(effective, PYTORCH_INDEX + "cu128"))
    assert torch_build_problems(text.replace(effective, PYTORCH_INDEX + "${TORCH_CUDA}"))
    assert torch_build_problems(text.replace('"$TORCH_SPEC"', "torch==2.13.0"))
    assert torch_build_problems(text.replace("ddpm-sweep.torch-cuda=", "torch-cuda="))
    assert torch_build_problems(text.replace(DRIVER_MINIMUM["12"], "525"))
    readme = (ROOT / "README.md").read_text()
    assert "TORCH_CUDA" in readme and DRIVER_MINIMUM["12"] in readme


def test_dockerfile_checks_the_torch_build_it_installed(monkeypatch):
    """The build fails when a .../cpu or .../cuNNN index gave another build (run here against
    this environment's torch)."""
    import torch

    runs = [rest for instr, rest in dockerfile(DOCKERFILE.read_text()) if instr == "RUN"]
    pattern = r"python -c '([^']+)' +\"\$DDPM_SWEEP_TORCH_INDEX_URL\""
    check = next(m[1] for run in runs if (m := re.search(pattern, run)))
    cuda = torch.version.cuda
    installed = "cu" + cuda.replace(".", "") if cuda else "cpu"

    def exit_code(index_url: str):
        monkeypatch.setattr(sys, "argv", ["-c", index_url])
        with pytest.raises(SystemExit) as exited:
            exec(check, {})
        return exited.value.code

    assert exit_code(PYTORCH_INDEX + installed) is None
    assert exit_code(PYTORCH_INDEX + installed + "/") is None
    assert exit_code("https://mirror.example/simple") is None  # not a build name: not checked
    other = "cu999" if installed == "cpu" else "cpu"
    assert f"not {other}" in exit_code(PYTORCH_INDEX + other)


def test_image_has_a_c_compiler_for_torch_compile():
    text = DOCKERFILE.read_text()
    assert c_compiler_problems(text) == []
    assert c_compiler_problems(text.replace(" libc6-dev", ""))
    assert c_compiler_problems(text.replace(" --no-install-recommends", ""))
    assert c_compiler_problems(text.replace(" && rm -rf /var/lib/apt/lists/*", ""))
    assert c_compiler_problems(text.replace("RUN apt-get update \\\n && ", "RUN "))
    apt = re.search(r"RUN apt-get update.*?lists/\*\n", text, re.S)[0]
    assert c_compiler_problems(text.replace(apt, ""))
    late = text.replace(apt, "").replace("USER ddpm\n", "USER ddpm\n" + apt)
    assert c_compiler_problems(late) == [
        "Dockerfile: apt-get install runs after USER (not as root)"
    ]


def test_classifier_cache_is_shared_by_every_ray_node(cluster):
    from lightning_modules.evaluation.classifier import CACHE_ENV_VAR

    assert CACHE_ENV_VAR == CACHE_VAR
    assert cache_problems(cluster) == []
    env = services(cluster)["ray-worker"]["environment"]
    unset = {k: v for k, v in env.items() if k != CACHE_VAR}
    assert cache_problems(broken(cluster, "ray-worker", environment=unset))
    in_home = env | {CACHE_VAR: "/home/ddpm/.cache/ddpm-sweep"}
    assert cache_problems(broken(cluster, "ray-worker", environment=in_home))
    assert cache_problems(broken(cluster, "ray-worker", environment=env | {CACHE_VAR: "cache"}))
    other = ["other-volume:" + SHARED_STORAGE]
    assert cache_problems(broken(cluster, "ray-worker", volumes=other))
    sweep_dir = env | {CACHE_VAR: SHARED_STORAGE + "/cache"}
    both = broken(
        broken(cluster, "ray-head", environment=sweep_dir), "ray-worker", environment=sweep_dir
    )
    assert any("sweep named 'cache'" in p for p in cache_problems(both))


def test_commands_are_executables_of_the_image(cluster):
    text = DOCKERFILE.read_text()
    assert executable_problems(cluster, text) == []
    assert {"mlflow", "ray", "ddpm-sweep"} <= image_executables(dockerfile(text))
    command = services(cluster)["mlflow"]["command"]
    assert executable_problems(broken(cluster, "mlflow", command=["mlfow", *command[1:]]), text)
    assert executable_problems(cluster, text.replace('CMD ["ddpm-sweep"', 'CMD ["ddpm_sweep"'))
    curl = {"test": ["CMD", "curl", "-f", "http://127.0.0.1:5000/health"]}
    assert executable_problems(broken(cluster, "mlflow", healthcheck=curl), text)


def test_commands_parse_with_the_installed_clis(cluster):
    """Every flag exists in (and every value parses for) the installed MLflow's and Ray's CLI."""
    from mlflow.cli import server as mlflow_server
    from ray.scripts.scripts import start as ray_start

    basic_auth = interpolate(load(BASIC_AUTH_FILE), sample_env())
    argvs = [services(cluster)[n]["command"] for n in PROJECT_IMAGE_SERVICES]
    argvs.append(services(basic_auth)["mlflow"]["command"])
    clis = {("mlflow", "server"): mlflow_server, ("ray", "start"): ray_start}
    for argv in argvs:
        clis[tuple(argv[:2])].make_context(" ".join(argv[:2]), [str(a) for a in argv[2:]])
    with pytest.raises(Exception, match="No such option"):
        mlflow_server.make_context("mlflow server", ["--alowed-hosts=mlflow:5000"])


def test_basic_auth_override_keeps_the_mlflow_command_in_step(cluster):
    auth = interpolate(load(BASIC_AUTH_FILE), sample_env())
    mlflow, base = services(auth)["mlflow"], services(cluster)["mlflow"]
    assert mlflow["command"] == [*base["command"], "--app-name=basic-auth"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] in [target for _, target in mounts(mlflow)]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] and env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    for name in ("ray-head", "ray-worker"):
        creds = services(auth)[name]["environment"]
        assert creds["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"], name
        assert creds["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"], name
    ini = (ROOT / "docker" / "mlflow-basic-auth.ini").read_text()
    assert "admin_password" not in ini  # the password comes from .env only
    user_store = re.search(r"database_uri = sqlite:///(\S+)", ini)[1]
    assert any(user_store.startswith(t + "/") for s, t in mounts(mlflow) if is_named_volume(s))


def test_cpu_only_override_resets_the_gpu_reservation():
    assert services(load(CPU_ONLY_FILE)) == {"ray-worker": {"deploy": Tagged("!reset", {})}}


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
    return [docker, "compose"] if probe.returncode == 0 else None


@pytest.mark.parametrize(
    "overrides", [(), (BASIC_AUTH_FILE,), (CPU_ONLY_FILE,)], ids=["main", "basic-auth", "cpu"]
)
def test_docker_compose_config_accepts_the_files(overrides):
    compose = _docker_compose()
    if compose is None:
        pytest.skip("the Docker Compose plugin is not installed (`docker compose version` fails)")
    files = [arg for path in (COMPOSE_FILE, *overrides) for arg in ("-f", str(path))]
    secrets = {k: v for k, v in sample_env().items() if SECRET_NAME.search(k)}
    base_env = {k: v for k, v in os.environ.items() if k not in secrets}
    cmd = [*compose, "--project-directory", str(ROOT), *files, "--env-file", str(ENV_EXAMPLE)]
    ok = subprocess.run(
        [*cmd, "config", "--quiet"],
        env=base_env | secrets,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    # .env.example as shipped leaves the secrets empty: compose must refuse it.
    refused = subprocess.run(
        [*cmd, "config", "--quiet"], env=base_env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and any(k in refused.stderr for k in secrets), refused.stderr
