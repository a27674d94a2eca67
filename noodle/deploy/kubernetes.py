"""A :class:`~noodle.deploy.model.Deployment` rendered to Kubernetes objects (plain dicts, YAML on demand).

The objects, in the order they are written::

    Service <name>                      the API for clients (only a coordinator that /readyz says is ready)
    Service <name>-coordinator          what workers join: publishes the coordinator before it is ready,
                                        since it only turns ready once workers joined and a plan runs
    Service <name>-workers              headless: stable DNS names for the worker pods
    Deployment <name>-coordinator       1 replica, `noodle serve --cluster --min-workers N`, strategy Recreate
                                        (two coordinators must never take joins at once)
    per pool: StatefulSet <name>-<pool> `noodle worker --join ... --name $(POD_NAME) --advertise $(POD_IP):PORT`
              PodDisruptionBudget       maxUnavailable 1: workers leave one at a time, the coordinator re-plans
    NetworkPolicy <name>-workers        the workers' gRPC port only from the coordinator and the other workers
                                        (the coordinator asks worker A to probe its link to worker B)

The cluster token is read from a Secret mounted as a file (``--token-file``), never put in an env var;
the API key (optional) comes from its Secret through ``NOODLE_API_KEY`` (``valueFrom``, no value in the spec).
"""

from __future__ import annotations

from typing import Any

import yaml

from noodle.deploy.model import Deployment, Pool, Resources, Toleration

__all__ = ["render", "to_yaml", "TOKEN_DIR", "TOKEN_KEY", "API_KEY_KEY", "CACHE_DIR", "JOIN_TIMEOUT_S"]

TOKEN_DIR = "/var/run/secrets/noodle"
TOKEN_KEY = "token"
API_KEY_KEY = "api-key"
CACHE_DIR = "/var/cache/noodle"
READY_FILE = "/tmp/noodle-ready"  # the worker creates it once the coordinator accepted its join
LEAVE_TIMEOUT_S = 20  # SIGTERM: the worker serves until the coordinator re-planned without it (< the 30 s grace)
JOIN_TIMEOUT_S = 600  # a worker waits this long for the coordinator's pod (image pulls) before it restarts
UID = 10001  # the image's non-root user

Obj = dict[str, Any]


def _num(value: float) -> str:
    return f"{value:g}"


def _meta(dep: Deployment, name: str, labels: dict[str, str]) -> Obj:
    meta: Obj = {"name": name, "labels": labels}
    if dep.namespace is not None:
        meta["namespace"] = dep.namespace
    return meta


def _labels(dep: Deployment, component: str, pool: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "noodle", "app.kubernetes.io/instance": dep.name,
              "app.kubernetes.io/component": component}  # fmt: skip
    if pool is not None:
        labels["noodle/pool"] = pool
    return labels


def _selector(dep: Deployment, component: str, pool: str | None = None) -> dict[str, str]:
    labels = _labels(dep, component, pool)
    del labels["app.kubernetes.io/name"]
    return labels


def _resources(res: Resources, gpus: int = 0) -> Obj:
    out: Obj = {}
    for part in ("requests", "limits"):
        amounts = {k: v for k, v in getattr(res, part).model_dump().items() if v is not None}
        if gpus and part == "limits":
            amounts["nvidia.com/gpu"] = str(gpus)  # an extended resource: the request follows the limit
        if amounts:
            out[part] = amounts
    return out


def _tolerations(items: list[Toleration]) -> list[Obj]:
    names = {"toleration_seconds": "tolerationSeconds"}
    return [{names.get(k, k): v for k, v in t.model_dump().items() if v is not None} for t in items]


def _volumes(dep: Deployment, cache: str | None = None) -> tuple[list[Obj], list[Obj]]:
    """The pod's volumes and the container's mounts: model (read-only), token file, /tmp, and ``cache``."""
    source: Obj = ({"persistentVolumeClaim": {"claimName": dep.model.claim, "readOnly": True}} if dep.model.claim
                   else {"hostPath": {"path": dep.model.host_path, "type": "Directory"}})  # fmt: skip
    volumes: list[Obj] = [{"name": "model", **source},
               {"name": "token", "secret": {"secretName": dep.secrets.token,
                                            "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}], "defaultMode": 0o440}},
               {"name": "tmp", "emptyDir": {}}]  # fmt: skip
    mounts: list[Obj] = [{"name": "model", "mountPath": dep.model.mount_path, "readOnly": True},
              {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]  # fmt: skip
    if cache is not None:  # measured unit costs; a restarted container keeps them, a new pod measures again
        volumes.append({"name": "cache", "emptyDir": {}})
        mounts.append({"name": "cache", "mountPath": cache})
    return volumes, mounts


def _pod_spec(dep: Deployment, container: Obj, volumes: list[Obj], node_selector: dict[str, str],
              tolerations: list[Toleration], grace_s: int) -> Obj:  # fmt: skip
    spec: Obj = {
        "automountServiceAccountToken": False,  # noodle never calls the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": grace_s,
        "containers": [container],
        "volumes": volumes,
    }  # fmt: skip
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = _tolerations(tolerations)
    return spec


def _container(dep: Deployment, name: str, image: str, args: list[str], env: list[Obj], mounts: list[Obj],
               port: Obj, probes: Obj, resources: Obj) -> Obj:  # fmt: skip
    container: Obj = {
        "name": name, "image": image, "imagePullPolicy": dep.image_pull_policy,
        "command": ["noodle"], "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, *env],  # the root file system is read-only
        "ports": [port], **probes, "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }  # fmt: skip
    if resources:
        container["resources"] = resources
    return container


def coordinator_args(dep: Deployment) -> list[str]:
    """``noodle serve --cluster ...`` as the coordinator's container runs it (after ``command: [noodle]``)."""
    c = dep.coordinator
    args = ["serve", "--model", dep.model.path, "--cluster", "--host", "0.0.0.0", "--port", str(c.port),
            "--min-workers", str(dep.min_workers), "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}",
            "--concurrency", str(c.concurrency), "--heartbeat-timeout", _num(c.heartbeat_timeout_s),
            "--drain-timeout", _num(c.drain_timeout_s)]  # fmt: skip
    if c.served_model_name is not None:
        args += ["--served-model-name", c.served_model_name]
    return args


def join_url(dep: Deployment) -> str:
    """The URL workers join: the coordinator's own Service (published before it is ready)."""
    return f"http://{dep.name}-coordinator:{dep.coordinator.port}"


def worker_args(dep: Deployment, pool: Pool) -> list[str]:
    """``noodle worker --join ...`` as a pool's container runs it; ``$(VAR)`` is expanded by the kubelet."""
    port = str(dep.worker_port)
    args = ["worker", "--model", dep.model.path, "--host", "0.0.0.0", "--port", port, "--join", join_url(dep),
            "--device", pool.device, "--name", "$(POD_NAME)", "--advertise", f"$(POD_IP):{port}",
            "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}", "--cache-dir", CACHE_DIR,
            "--join-timeout", str(JOIN_TIMEOUT_S), "--ready-file", READY_FILE,
            "--leave-timeout", str(LEAVE_TIMEOUT_S)]  # fmt: skip
    if pool.threads:
        args += ["--threads", str(pool.threads)]
    return args


def _services(dep: Deployment) -> list[Obj]:
    port = dep.coordinator.port
    api: Obj = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(dep, dep.name, _labels(dep, "api")),
                "spec": {"type": dep.coordinator.service_type, "selector": _selector(dep, "coordinator"),
                         "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]}}  # fmt: skip
    joins: Obj = {"apiVersion": "v1", "kind": "Service",
                  "metadata": _meta(dep, f"{dep.name}-coordinator", _labels(dep, "coordinator")),
                  "spec": {"type": "ClusterIP", "selector": _selector(dep, "coordinator"),
                           "publishNotReadyAddresses": True,
                           "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]}}  # fmt: skip
    workers: Obj = {"apiVersion": "v1", "kind": "Service",
                    "metadata": _meta(dep, f"{dep.name}-workers", _labels(dep, "worker")),
                    "spec": {"clusterIP": "None", "selector": _selector(dep, "worker"),
                             "ports": [{"name": "grpc", "port": dep.worker_port, "targetPort": "grpc",
                                        "protocol": "TCP"}]}}  # fmt: skip
    return [api, joins, workers]


def _coordinator(dep: Deployment) -> Obj:
    c = dep.coordinator
    env: list[Obj] = []
    if dep.secrets.api_key is not None:
        env.append({"name": "NOODLE_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": dep.secrets.api_key, "key": API_KEY_KEY}}})  # fmt: skip
    probes = {"readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                                 "failureThreshold": 2},
              "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "initialDelaySeconds": 10,
                                "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6}}  # fmt: skip
    volumes, mounts = _volumes(dep)
    container = _container(dep, "coordinator", dep.image, coordinator_args(dep), env, mounts,
                           {"name": "http", "containerPort": c.port, "protocol": "TCP"}, probes,
                           _resources(c.resources))  # fmt: skip
    labels = _labels(dep, "coordinator")
    grace = int(c.drain_timeout_s) + 15  # drain, then close the executor
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(dep, f"{dep.name}-coordinator", labels),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": _selector(dep, "coordinator")},
                     "template": {"metadata": {"labels": labels},
                                  "spec": _pod_spec(dep, container, volumes, c.node_selector, c.tolerations,
                                                    grace)}}}  # fmt: skip


def _pool(dep: Deployment, pool: Pool) -> list[Obj]:
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]  # fmt: skip
    # Ready = the coordinator accepted the join (the file; a rolling update waits for it, not for the port);
    # alive = it listens (every gRPC call needs the cluster token, so the probe cannot call it).
    probes = {"readinessProbe": {"exec": {"command": ["test", "-f", READY_FILE]}, "periodSeconds": 5,
                                 "failureThreshold": 2},
              "livenessProbe": {"tcpSocket": {"port": "grpc"}, "initialDelaySeconds": 10, "periodSeconds": 10,
                                "failureThreshold": 6}}  # fmt: skip
    volumes, mounts = _volumes(dep, CACHE_DIR)
    container = _container(dep, "worker", pool.image or dep.image, worker_args(dep, pool), env, mounts,
                           {"name": "grpc", "containerPort": dep.worker_port, "protocol": "TCP"}, probes,
                           _resources(pool.resources, pool.gpu_count))  # fmt: skip
    name = f"{dep.name}-{pool.name}"
    labels = _labels(dep, "worker", pool.name)
    selector = _selector(dep, "worker", pool.name)
    sts: Obj = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(dep, name, labels),
                "spec": {"replicas": pool.replicas, "serviceName": f"{dep.name}-workers",
                         "podManagementPolicy": "Parallel", "updateStrategy": {"type": "RollingUpdate"},
                         "selector": {"matchLabels": selector},
                         "template": {"metadata": {"labels": labels},
                                      "spec": _pod_spec(dep, container, volumes, pool.node_selector,
                                                        pool.tolerations, 30)}}}  # fmt: skip
    pdb: Obj = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(dep, name, labels),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}  # fmt: skip
    return [sts, pdb]


def _network_policy(dep: Deployment) -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(dep, f"{dep.name}-workers", _labels(dep, "worker")),
            "spec": {"podSelector": {"matchLabels": _selector(dep, "worker")}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": _selector(dep, "coordinator")}},
                                           {"podSelector": {"matchLabels": _selector(dep, "worker")}}],
                                  "ports": [{"protocol": "TCP", "port": dep.worker_port}]}]}}  # fmt: skip


def render(dep: Deployment) -> list[Obj]:
    """Every object of the deployment, in apply order (services first)."""
    objects = [*_services(dep), _coordinator(dep)]
    for pool in dep.pools:
        objects += _pool(dep, pool)
    objects.append(_network_policy(dep))
    return objects


class _Dumper(yaml.SafeDumper):
    """No anchors and aliases: a label map shared by two objects is written out twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(objects: list[Obj]) -> str:
    """A multi-document YAML stream, keys in the order rendered."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
