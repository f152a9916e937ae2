"""deploy/kubernetes and the Containerfile: built, schema-checked, and held to the code they run.

Each overlay (and each with the mTLS component) is built by real kustomize (`kubectl kustomize`),
every object is validated against the Kubernetes API schemas (kubernetes-validate, strict), and
every command, flag, FLEETWATCH_* variable, TOML key, port, probe path, mounted path and rule the
manifests name is checked against the daemons' own parsers, config classes, routes and files.
A missing kubectl skips the kustomize-built checks on a developer's machine and fails them under
CI, as tests/services.py does for Prometheus.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

import fleetwatch
from fleetwatch.addresses import parse_host_port
from fleetwatch.agent.config import AgentConfig
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.configfile import ENV_PREFIX, load_config

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

OVERLAYS = ("sqlite", "postgresql")
# Each overlay as shipped and with components/mtls added, as an operator enables it.
VARIANTS = (*OVERLAYS, *(f"{o}+mtls" for o in OVERLAYS))
NAMESPACE = "fleetwatch"
# The oldest Kubernetes still in upstream support when this was written, and the newest the
# installed kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.31", ".".join(latest_version().split(".")[:2]))
MONITORING_GROUP = "monitoring.coreos.com/v1"

# The two daemons, by console script: the settings class each one's TOML and FLEETWATCH_* feed.
DAEMONS: dict[str, type] = {"fleetwatch-agent": AgentConfig, "fleetwatch-collector": CollectorConfig}
# Variables that are no fleetwatch setting but read by something else in the pod.
FOREIGN_ENV = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
# Values of the downward API in a pod, for loading the configuration as the daemon would.
DOWNWARD_SAMPLES = {"spec.nodeName": "gpu-node-001"}
# What a setting's file (database_url_file, api_read_token_file, ...) holds, for loading.
FILE_SAMPLES = {"database_url": "postgresql+psycopg://fleetwatch:secret@db.example.internal/fleetwatch"}

# The agent's view of the node: each path setting that must reach the host path a systemd agent
# reads (the setting's default), and whether the agent writes there (else it is mounted read-only).
HOST_PATH_SETTINGS = {
    "procfs_root": False,
    "sysfs_root": False,
    "disk_path": False,
    "kmsg_path": False,
    "pod_resources_socket": False,
    "step_socket": True,
    "spool_dir": True,
}
# The kubelet's pod-resources socket (dcgm-exporter's default as well).
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"

# The PrometheusRule objects of base/prometheusrules.yaml and the rule file each one copies.
RULE_COPIES = {"fleetwatch-collector-rules": "rules.yml", "fleetwatch-gpu-rules": "gpu-rules.yml"}
RULE_FILES = sorted((ROOT / "deploy" / "prometheus").glob("*rules.yml"))


# --- building -------------------------------------------------------------------------------


def kustomize() -> list[str]:
    """The kustomize command line: kubectl's built-in one, else a standalone kustomize."""
    for name, verb in (("kubectl", "kustomize"), ("kustomize", "build")):
        path = shutil.which(name)
        if path:
            return [path, verb]
    reason = "kubectl (or kustomize) not installed: deploy/kubernetes is built with `kubectl kustomize`"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every variant's objects. The tree is copied, so that the mTLS overlays can sit beside the
    shipped ones (kustomize takes only relative paths)."""
    command = kustomize()
    tree = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBE, tree)
    for overlay in OVERLAYS:
        variant = tree / "overlays" / f"{overlay}+mtls"
        variant.mkdir()
        (variant / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [f"../{overlay}"],
                    "components": ["../../components/mtls"],
                }
            )
        )
    out = {}
    for name in VARIANTS:
        result = subprocess.run([*command, str(tree / "overlays" / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"kustomize build of {name}:\n{result.stderr}"
        out[name] = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    return out


@pytest.fixture(params=VARIANTS)
def objects(request: pytest.FixtureRequest, built: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return copy.deepcopy(built[request.param])


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@dataclass
class Workload:
    """A container of a DaemonSet or StatefulSet with its pod and the objects built beside it."""

    obj: dict[str, Any]
    container: dict[str, Any]
    objects: list[dict[str, Any]]

    @property
    def pod(self) -> dict[str, Any]:
        return self.obj["spec"]["template"]["spec"]

    @property
    def daemon(self) -> str:
        return self.container["command"][0]

    def container_port(self, name: str) -> int:
        ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        assert name in ports, f"{self.daemon}: no container port named {name!r} (has {sorted(ports)})"
        return ports[name]

    def mount(self, path: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The volume mount `path` lies on (the deepest), its volume and the path below the mount point.

        A volume claim template stands in as {"persistentVolumeClaim": {...}}.
        """
        mounts = sorted(self.container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
        for m in mounts:
            point = m["mountPath"].rstrip("/") or "/"
            if path == point or path.startswith(point.rstrip("/") + "/"):
                volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
                for claim in self.obj["spec"].get("volumeClaimTemplates", []):
                    volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim}
                assert m["name"] in volumes, f"{self.daemon}: mount {point} names no volume {m['name']!r}"
                return m, volumes[m["name"]], path[len(point) :].lstrip("/")
        raise AssertionError(f"{self.daemon}: {path} is on no volume mount of the container")


def workloads(objects: list[dict[str, Any]]) -> Iterator[Workload]:
    for obj in objects:
        if obj["kind"] in ("DaemonSet", "StatefulSet", "Deployment"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                yield Workload(obj, container, objects)


def workload(objects: list[dict[str, Any]], daemon: str) -> Workload:
    (found,) = [w for w in workloads(objects) if w.daemon == daemon]
    return found


def build_parser(daemon: str) -> Any:
    module, _, _ = SCRIPTS[daemon].partition(":")
    return importlib.import_module(module).build_parser()


def item_paths(volume: dict[str, Any]) -> set[str] | None:
    """The file names a ConfigMap or Secret volume shows, None when it shows every key."""
    source = volume.get("configMap") or volume.get("secret") or {}
    items = source.get("items")
    return None if items is None else {i["path"] for i in items}


@dataclass
class Effective:
    """A daemon's configuration as its pod would load it, and the container paths of its `*_file` settings."""

    config: Any
    files: dict[str, str]


def effective_config(w: Workload, tmp_path: Path) -> Effective:
    """Loads the daemon's settings from its ConfigMap file, its environment and its flags, with the project's loader."""
    cls = DAEMONS[w.daemon]
    args = build_parser(w.daemon).parse_args(w.container.get("args", []))
    _, volume, name = w.mount(str(args.config))
    assert "configMap" in volume, f"{w.daemon}: --config {args.config} is not on a ConfigMap volume"
    configmap = one(w.objects, "ConfigMap", volume["configMap"]["name"])
    key = next((i["key"] for i in volume["configMap"].get("items", []) if i["path"] == name), name)
    assert key in configmap["data"], f"{w.daemon}: ConfigMap {configmap['metadata']['name']} has no {key}"
    toml = tmp_path / f"{w.daemon}.toml"
    toml.write_text(configmap["data"][key])

    fields = {f.name: f for f in dataclasses.fields(cls)}
    file_settings = {name for name, f in fields.items() if f.metadata.get("file_for")}
    in_toml = file_settings & set(tomllib.loads(toml.read_text()))
    assert not in_toml, f"{w.daemon}: teach this test to load {sorted(in_toml)} from the TOML file"
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    for var in w.container.get("env", []):
        if "value" in var:
            value = var["value"]
        else:
            field_path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert field_path in DOWNWARD_SAMPLES, f"{var['name']}: no sample for {field_path}"
            value = DOWNWARD_SAMPLES[field_path]
        setting = var["name"].removeprefix(ENV_PREFIX).lower()
        if setting in file_settings and value:
            # Read at load: the mount is checked elsewhere; here a file with a sample stands in.
            files[setting] = value
            target = fields[setting].metadata["file_for"]
            sample = tmp_path / f"{setting}.sample"
            sample.write_text(FILE_SAMPLES.get(target, "0123456789abcdef0123456789abcdef") + "\n")
            value = str(sample)
        env[var["name"]] = value
    config = load_config(cls, path=toml, env=env, flags=args)
    for name in fields:
        if name.endswith("_file") and name not in file_settings and getattr(config, name):
            files[name] = getattr(config, name)
    return Effective(config, files)


# --- Kubernetes schemas --------------------------------------------------------------------


def test_every_variant_builds_the_objects_of_one_fleetwatch(objects: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted(
        [
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "fleetwatch-agent"),
            ("ServiceAccount", "fleetwatch-collector"),
            ("ConfigMap", one(objects, "ConfigMap")["metadata"]["name"]),
            ("DaemonSet", "fleetwatch-agent"),
            ("StatefulSet", "fleetwatch-collector"),
            ("Service", "fleetwatch-collector"),
            ("ServiceMonitor", "fleetwatch-collector"),
            ("PodMonitor", "fleetwatch-agent"),
            *(("PrometheusRule", name) for name in RULE_COPIES),
        ]
    )
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleetwatch"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_api_schema(objects: list[dict[str, Any]], version: str) -> None:
    for obj in objects:
        if obj["apiVersion"] == MONITORING_GROUP:
            continue  # Prometheus Operator CRDs: kubernetes-validate has no schema; checked by hand below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {exc}") from None


def test_strict_schema_check_refuses_a_misspelt_field(built: dict[str, list[dict[str, Any]]]) -> None:
    """The check above can fail: strict mode refuses a field the API does not have."""
    daemonset = copy.deepcopy(one(built["sqlite"], "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_volume_mount_has_a_volume_and_every_volume_a_mount(objects: list[dict[str, Any]]) -> None:
    for w in workloads(objects):
        volumes = {v["name"] for v in w.pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in w.obj["spec"].get("volumeClaimTemplates", [])}
        mounted = {m["name"] for m in w.container.get("volumeMounts", [])}
        assert mounted <= volumes | claims, w.daemon
        assert volumes | claims <= mounted, f"{w.daemon}: volumes nothing mounts"


# --- commands, flags, variables, settings ---------------------------------------------------


def test_commands_are_console_scripts_and_their_flags_parse(objects: list[dict[str, Any]]) -> None:
    daemons = set()
    for w in workloads(objects):
        command = w.container["command"]
        assert len(command) == 1, f"{command}: the console script alone; flags go in args"
        assert w.daemon in SCRIPTS, f"{w.daemon} is no [project.scripts] entry of pyproject.toml"
        try:
            build_parser(w.daemon).parse_args(w.container.get("args", []))
        except SystemExit:
            raise AssertionError(f"{w.daemon} refuses its args {w.container.get('args')}") from None
        daemons.add(w.daemon)
    assert daemons == set(DAEMONS)


def test_environment_variables_are_settings_of_their_daemon(objects: list[dict[str, Any]]) -> None:
    for w in workloads(objects):
        fields = {f.name for f in dataclasses.fields(DAEMONS[w.daemon])}
        for var in w.container.get("env", []):
            name = var["name"]
            if name in FOREIGN_ENV:
                continue
            assert name.startswith(ENV_PREFIX), f"{w.daemon}: {name} is neither a fleetwatch setting nor known"
            assert name.removeprefix(ENV_PREFIX).lower() in fields, f"{w.daemon}: {name} names no setting"


def test_configuration_loads_with_the_projects_loader(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """Every TOML key is a setting and every value passes its check (load_config refuses anything else)."""
    from fleetwatch.collector.tls import check_listen_security

    used_keys = set()
    for w in workloads(objects):
        effective = effective_config(w, tmp_path)
        assert isinstance(effective.config, DAEMONS[w.daemon])
        for volume in w.pod["volumes"]:
            if "configMap" in volume:
                used_keys |= item_paths(volume) or set()
        if w.daemon == "fleetwatch-collector":
            config = effective.config
            tls = bool(config.tls_cert_file)
            # Plaintext off loopback only with insecure set, which is what the collector itself checks.
            check_listen_security(config, tls=tls)
    assert used_keys == set(one(objects, "ConfigMap")["data"]), "a TOML file in the ConfigMap that no pod mounts"


def test_agent_names_itself_after_its_kubernetes_node(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    agent = workload(objects, "fleetwatch-agent")
    node = {v["name"]: v for v in agent.container["env"]}["FLEETWATCH_NODE"]
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert effective_config(agent, tmp_path).config.node == DOWNWARD_SAMPLES["spec.nodeName"]


def test_mtls_when_the_component_is_on_and_only_then(built: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    for variant in VARIANTS:
        agent = effective_config(workload(built[variant], "fleetwatch-agent"), tmp_path).config
        collector = effective_config(workload(built[variant], "fleetwatch-collector"), tmp_path).config
        mtls = variant.endswith("+mtls")
        assert bool(agent.tls_ca_file and agent.tls_cert_file and agent.tls_key_file) is mtls, variant
        assert bool(collector.tls_cert_file and collector.tls_key_file and collector.tls_client_ca_file) is mtls
        assert collector.insecure is not mtls, variant


# --- ports, probes, Service, monitors -------------------------------------------------------


def service_dns(service: dict[str, Any]) -> str:
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"


def test_container_ports_are_the_configured_listen_ports(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    agent = workload(objects, "fleetwatch-agent")
    config = effective_config(agent, tmp_path).config
    assert agent.container_port("metrics") == parse_host_port(config.metrics_listen)[1]
    assert {p["name"] for p in agent.container["ports"]} == {"metrics"}

    collector = workload(objects, "fleetwatch-collector")
    config = effective_config(collector, tmp_path).config
    assert collector.container_port("grpc") == parse_host_port(config.grpc_listen)[1]
    assert collector.container_port("http") == parse_host_port(config.http_listen)[1]
    assert {p["name"] for p in collector.container["ports"]} == {"grpc", "http"}


def test_service_routes_to_the_collectors_ports_and_agents_dial_it(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    service = one(objects, "Service")
    collector = workload(objects, "fleetwatch-collector")
    labels = collector.obj["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects no collector pod"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in ports.values():
        # A named target, so the Service follows the container port when it changes.
        collector.container_port(port["targetPort"])
    assert collector.obj["spec"]["serviceName"] == service["metadata"]["name"]

    agent = effective_config(workload(objects, "fleetwatch-agent"), tmp_path).config
    (address,) = agent.collector_address
    host, port = parse_host_port(address)
    assert (host, port) == (service_dns(service), ports["grpc"]["port"])
    external = urllib.parse.urlsplit(effective_config(collector, tmp_path).config.external_url)
    tls = bool(effective_config(collector, tmp_path).config.tls_cert_file)
    assert (external.scheme, external.hostname, external.port) == (
        "https" if tls else "http",
        service_dns(service),
        ports["http"]["port"],
    )


def collector_routes(config: CollectorConfig, tmp_path: Path) -> dict[tuple[str, str], Any]:
    """(method, path) -> Access of every route the collector's HTTP server has under `config`."""
    from fleetwatch.collector.app import CollectorApp
    from fleetwatch.collector.httpauth import ROUTE_ACCESS
    from fleetwatch.collector.web import build_web_app

    app = CollectorApp(dataclasses.replace(config, database_url=f"sqlite:///{tmp_path / 'routes.db'}"))
    try:
        web_app = build_web_app(app)
        return {(route.method, route.resource.canonical): access for route, access in web_app[ROUTE_ACCESS].items()}
    finally:
        app.store.close()


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in container}


def test_collector_probes_are_open_routes_on_its_http_port(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    from fleetwatch.collector.httpauth import Access

    collector = workload(objects, "fleetwatch-collector")
    config = effective_config(collector, tmp_path).config
    routes = collector_routes(config, tmp_path)
    found = probes(collector.container)
    assert {"livenessProbe", "readinessProbe"} <= set(found)
    assert found["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert found["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind, probe in found.items():
        get = probe["httpGet"]
        # The kubelet sends no token: a probe path must be open under this configuration.
        assert routes.get(("GET", get["path"])) == Access.OPEN, f"{kind}: GET {get['path']} is no open route"
        assert collector.container_port(get["port"]) == parse_host_port(config.http_listen)[1]
        assert get.get("scheme", "HTTP") == ("HTTPS" if config.tls_cert_file else "HTTP"), kind


def test_agent_probes_read_its_metrics_endpoint(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    agent = workload(objects, "fleetwatch-agent")
    config = effective_config(agent, tmp_path).config
    found = probes(agent.container)
    assert {"livenessProbe", "readinessProbe"} <= set(found)
    for kind, probe in found.items():
        get = probe["httpGet"]
        assert agent.container_port(get["port"]) == parse_host_port(config.metrics_listen)[1], kind
        assert get["path"] == "/metrics"
        assert get.get("scheme", "HTTP") == ("HTTPS" if config.metrics_tls_cert_file else "HTTP"), kind
        # Basic auth would answer the kubelet 401.
        assert not config.metrics_basic_auth_user or get.get("httpHeaders"), kind


def jobs_in_rules(rule: dict[str, Any]) -> set[str]:
    return {
        job
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        for job in re.findall(r'job="([^"]+)"', r["expr"])
    }


def test_monitors_scrape_real_ports_with_the_jobs_the_rules_expect(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    from fleetwatch.collector.httpauth import Access

    service = one(objects, "Service")
    collector = workload(objects, "fleetwatch-collector")
    collector_config = effective_config(collector, tmp_path).config
    routes = collector_routes(collector_config, tmp_path)
    monitor = one(objects, "ServiceMonitor")
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector", "targetLabels"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "tlsConfig", "relabelings", "authorization"}
        assert endpoint["port"] in service_ports
        assert routes[("GET", endpoint["path"])] == Access.OPEN or "authorization" in endpoint
        if collector_config.tls_cert_file:
            assert endpoint["scheme"] == "https"
            # The CA that issued the collector's certificate, from the Secret the collector mounts.
            ca = endpoint["tlsConfig"]["ca"]["secret"]
            _, volume, name = collector.mount(collector_config.tls_client_ca_file)
            assert (ca["name"], ca["key"]) == (volume["secret"]["secretName"], name)
            assert endpoint["tlsConfig"]["serverName"] == service_dns(service)
        else:
            assert endpoint.get("scheme", "http") == "http"
    collector_job = service["metadata"]["labels"][spec["jobLabel"]]

    agent = workload(objects, "fleetwatch-agent")
    agent_config = effective_config(agent, tmp_path).config
    pod_monitor = one(objects, "PodMonitor")
    spec = pod_monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector", "podTargetLabels"}
    pod_labels = agent.obj["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "tlsConfig", "relabelings", "basicAuth"}
        assert agent.container_port(endpoint["port"]) == parse_host_port(agent_config.metrics_listen)[1]
        assert endpoint.get("scheme", "http") == ("https" if agent_config.metrics_tls_cert_file else "http")
    agent_job = pod_labels[spec["jobLabel"]]

    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert set().union(*(jobs_in_rules(r) for r in rules)) == {collector_job, agent_job}


# --- the rules ------------------------------------------------------------------------------


def test_prometheus_rules_are_the_rule_files_exactly() -> None:
    """base/prometheusrules.yaml copies deploy/prometheus/*rules.yml; they must not drift apart."""
    copies = {
        o["metadata"]["name"]: o
        for o in yaml.safe_load_all((KUBE / "base" / "prometheusrules.yaml").read_text())
        if o and o["kind"] == "PrometheusRule"
    }
    assert set(copies) == set(RULE_COPIES)
    assert sorted(RULE_COPIES.values()) == sorted(p.name for p in RULE_FILES)
    for name, file in RULE_COPIES.items():
        rule = copies[name]
        assert rule["apiVersion"] == MONITORING_GROUP
        assert set(rule["spec"]) == {"groups"}
        original = yaml.safe_load((ROOT / "deploy" / "prometheus" / file).read_text())
        assert rule["spec"]["groups"] == original["groups"], f"{name} differs from deploy/prometheus/{file}"
    base = yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text())
    assert "prometheusrules.yaml" in base["resources"]


# --- paths ----------------------------------------------------------------------------------


def test_agent_reads_the_nodes_own_paths_through_host_volumes(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    agent = workload(objects, "fleetwatch-agent")
    config = effective_config(agent, tmp_path).config
    defaults = {f.name: f.default for f in dataclasses.fields(AgentConfig)}
    assert defaults["pod_resources_socket"] == POD_RESOURCES_SOCKET
    for setting, writes in HOST_PATH_SETTINGS.items():
        path = getattr(config, setting)
        assert path, f"{setting} is off"
        mount, volume, below = agent.mount(path)
        assert "hostPath" in volume, f"{setting} = {path} is not on a hostPath volume"
        host = posixpath.normpath(posixpath.join(volume["hostPath"]["path"], below))
        # What a systemd agent on the same node reads: the setting's default.
        assert host == defaults[setting], f"{setting} = {path} reaches the host's {host}, not {defaults[setting]}"
        assert bool(mount.get("readOnly")) is not writes, f"{setting}: mounted {'read-only' if not writes else 'rw'}"
    kmsg = agent.mount(config.kmsg_path)[1]["hostPath"]
    assert kmsg["type"] == "CharDevice"


def test_every_file_a_setting_names_is_mounted(built: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """TLS files, the database URL's file, ...: on a volume, and on a Secret or ConfigMap one, among its items."""
    checked = set()
    for variant in VARIANTS:
        for w in workloads(built[variant]):
            for setting, path in effective_config(w, tmp_path).files.items():
                _, volume, name = w.mount(path)
                names = item_paths(volume)
                assert names is None or name in names, f"{variant}: {setting} = {path}: no item {name!r} in its volume"
                checked.add(setting)
    assert {"database_url_file", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"} <= checked


def test_collector_database_is_where_the_overlay_puts_it(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for variant in VARIANTS:
        collector = workload(built[variant], "fleetwatch-collector")
        effective = effective_config(collector, tmp_path)
        url = effective.config.database_url.reveal()
        if variant.startswith("sqlite"):
            assert url.startswith("sqlite:////")
            _, volume, _ = collector.mount(url.removeprefix("sqlite:///"))
            assert "persistentVolumeClaim" in volume, f"{variant}: the SQLite file is not on a persistent volume"
            assert collector.obj["spec"]["replicas"] == 1
        else:
            assert url == FILE_SAMPLES["database_url"]  # read from the file database_url_file names
            _, volume, _ = collector.mount(effective.files["database_url_file"])
            assert "secret" in volume, f"{variant}: the database URL is not from a Secret"
            assert "volumeClaimTemplates" not in collector.obj["spec"]
            # Collectors share a PostgreSQL database (collector/cluster.py): more than one runs.
            assert collector.obj["spec"]["replicas"] >= 2


# --- the agent's pod on a GPU node ----------------------------------------------------------


def test_agent_runs_on_every_gpu_node_with_the_nodes_view(objects: list[dict[str, Any]]) -> None:
    agent = workload(objects, "fleetwatch-agent")
    pod = agent.pod
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env = {v["name"]: v.get("value") for v in agent.container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # No GPU is allocated through the device plugin: the agent must not take one from a job.
    for part in ("requests", "limits"):
        assert "nvidia.com/gpu" not in agent.container["resources"][part]
        assert {"cpu", "memory"} <= set(agent.container["resources"][part])


def test_collector_runs_unprivileged(objects: list[dict[str, Any]]) -> None:
    collector = workload(objects, "fleetwatch-collector")
    assert collector.pod["securityContext"]["runAsNonRoot"] is True
    context = collector.container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]


def test_images_are_this_version(objects: list[dict[str, Any]]) -> None:
    for w in workloads(objects):
        assert w.container["image"].rpartition(":")[2] == fleetwatch.__version__, w.daemon


# --- Containerfile ----------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """The Containerfile as (INSTRUCTION, arguments), continuation lines joined, comments left out."""
    lines, out = [], []
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not lines:
            continue
        lines.append(raw.rstrip())
        if raw.rstrip().endswith("\\"):
            lines[-1] = lines[-1][:-1]
            continue
        text = " ".join(part.strip() for part in lines).strip()
        lines = []
        if text:
            word, _, rest = text.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copied_sources() -> list[str]:
    sources = []
    for word, rest in instructions():
        if word == "COPY":
            parts = shlex.split(rest)
            if any(p.startswith("--from") for p in parts):
                continue
            sources += [p for p in parts[:-1] if not p.startswith("--")]
    return sources


def test_containerfile_copies_tracked_files_that_the_build_needs() -> None:
    sources = copied_sources()
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True)
        assert tracked.stdout.strip(), f"COPY {source}: nothing tracked by git there (a build output?)"
    copied = [posixpath.normpath(s) for s in sources]

    def covered(path: str) -> bool:
        return any(path == c or path.startswith(c + "/") for c in copied)

    needed = [
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        *PYPROJECT["tool"]["setuptools"]["package-dir"].values(),
    ]
    missing = [p for p in needed if not covered(posixpath.normpath(p))]
    assert not missing, f"pip install . needs {missing}, which the Containerfile does not COPY"


def test_containerfile_installs_and_runs_the_console_scripts() -> None:
    steps = instructions()
    run = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"pip install '\.\[all\]'", run)
    assert "all" in PYPROJECT["project"]["optional-dependencies"]
    env = " ".join(rest for word, rest in steps if word == "ENV")
    venv = re.search(r"python -m venv (\S+)", run)
    assert venv and f"PATH={venv.group(1)}/bin:" in env, "the venv's console scripts are not on PATH"
    (cmd,) = [json.loads(rest) for word, rest in steps if word == "CMD"]
    assert cmd[0] in SCRIPTS
    assert not [word for word, _ in steps if word == "ENTRYPOINT"], "the manifests choose the daemon as command"


def test_containerfile_user_labels_and_ports_agree_with_the_project() -> None:
    steps = instructions()
    (user,) = [rest for word, rest in steps if word == "USER"]
    statefulset = yaml.safe_load((KUBE / "base" / "collector-statefulset.yaml").read_text())
    assert int(user.partition(":")[0]) == statefulset["spec"]["template"]["spec"]["securityContext"]["runAsUser"]

    args = dict(rest.partition("=")[::2] for word, rest in steps if word == "ARG")
    assert args["VERSION"] == fleetwatch.__version__
    labels = dict(
        re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', " ".join(r for w, r in steps if w == "LABEL"))
    )
    assert labels["org.opencontainers.image.title"] == PYPROJECT["project"]["name"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert {"org.opencontainers.image.source", "org.opencontainers.image.description"} <= set(labels)

    (expose,) = [rest for word, rest in steps if word == "EXPOSE"]
    defaults = [CollectorConfig().grpc_listen, CollectorConfig().http_listen, AgentConfig().metrics_listen]
    assert sorted(int(p) for p in expose.split()) == sorted(parse_host_port(a)[1] for a in defaults)


def test_kustomization_image_tag_is_this_version() -> None:
    base = yaml.safe_load((KUBE / "base" / "kustomization.yaml").read_text())
    (image,) = base["images"]
    assert image["name"] == "fleetwatch" and image["newTag"] == fleetwatch.__version__
