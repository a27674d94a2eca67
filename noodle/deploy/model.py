"""The deployment file of ``noodle deploy kubernetes``: a strict, frozen pydantic model.

One short YAML document says where the model lies (a PersistentVolumeClaim or a host folder),
which image runs, the coordinator's settings, the secrets (cluster token, optional API key) and
one or more **node pools**: a StatefulSet of workers each, with its own node selector,
tolerations, resources, replicas and device. Unequal pools are the point: the coordinator
measures every worker that joins and plans layers across them.

Everything is checked here, at the edge; a bad file is one line naming the field
(``deploy.yaml: pools[1].replicas: ...``). The JSON Schema in ``deploy/deployment.schema.json``
(also the Helm chart's ``values.schema.json``) is generated from these models
(``python -m noodle.deploy.model``).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from noodle.docfile import load_document, validation_message
from noodle.errors import SpecError

__all__ = ["Toleration", "Resources", "ModelVolume", "Coordinator", "Secrets", "Pool", "Deployment",
           "load_deployment", "parse_deployment", "quantity", "deployment_json_schema", "MAX_NAME"]

SCHEMA_HINT = "deploy/deployment.schema.json"
# A StatefulSet's pods carry `controller-revision-hash: <name>-<10 chars>`, a label value of at most 63.
MAX_NAME = 52
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?|\.[0-9]+)(?P<suffix>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX: dict[str, Decimal | int] = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
           "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}  # fmt: skip
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                         r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # fmt: skip
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")

Port = Annotated[StrictInt, Field(ge=1, le=65535)]


def quantity(text: str) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2``, ``16Gi``) as a number; ValueError when it is not one."""
    m = _QUANTITY.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity, e.g. 500m, 2, 16Gi")
    return Decimal(m["num"]) * _SUFFIX[m["suffix"] or ""]


def _dns_label(value: str, what: str) -> str:
    if len(value) > MAX_NAME or not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid {what}: lowercase letters, digits and '-', starting with a letter, "
                         f"at most {MAX_NAME} characters")  # fmt: skip
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        if len(key.rsplit("/", 1)[-1]) > 63 or len(key) > 316 or not _LABEL_NAME.match(key):
            raise ValueError(f"label key {key!r} is not a Kubernetes label name")
        if len(val) > 63 or not _LABEL_VALUE.match(val):
            raise ValueError(f"label value {val!r} (key {key!r}) is not a Kubernetes label value")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Toleration(_Strict):
    """A pod toleration, as Kubernetes spells it (snake_case here)."""

    key: StrictStr | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: StrictStr | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: StrictInt | None = Field(None, ge=0, le=10**9, description="NoExecute only")

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        _labels({self.key or "k": self.value or ""})
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value; drop value or use operator Equal")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists (it tolerates every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies only to effect NoExecute")
        return self


class _Amounts(_Strict):
    cpu: StrictStr | None = Field(None, description="a quantity: 500m, 2")
    memory: StrictStr | None = Field(None, description="a quantity: 512Mi, 16Gi")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and quantity(value) <= 0:
            raise ValueError(f"must be more than 0, got {value!r}")
        return value


class Resources(_Strict):
    """CPU and memory requests and limits (GPU counts go in the pool's ``gpus``)."""

    requests: _Amounts = Field(default_factory=_Amounts)
    limits: _Amounts = Field(default_factory=_Amounts)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        for name in ("cpu", "memory"):
            want, cap = getattr(self.requests, name), getattr(self.limits, name)
            if want is not None and cap is not None and quantity(want) > quantity(cap):
                raise ValueError(f"requests.{name} {want} is more than limits.{name} {cap}; a request must fit its limit")
        return self


class ModelVolume(_Strict):
    """Where the model folder lies: a PersistentVolumeClaim (``claim``) or a folder on every node (``host_path``)."""

    claim: StrictStr | None = Field(None, description="PersistentVolumeClaim holding model folders (ReadOnlyMany for "
                                                      "several nodes)")  # fmt: skip
    host_path: StrictStr | None = Field(None, description="a folder on each node holding model folders")
    folder: StrictStr = Field(min_length=1, description="the model folder inside the volume, e.g. gpt2")
    mount_path: StrictStr = Field("/models", description="where the volume is mounted in every pod")

    @model_validator(mode="after")
    def _one_source(self) -> ModelVolume:
        if (self.claim is None) == (self.host_path is None):
            raise ValueError("give exactly one of claim (a PersistentVolumeClaim) or host_path (a node folder)")
        if self.claim is not None and (len(self.claim) > 253 or not _DNS_SUBDOMAIN.match(self.claim)):
            raise ValueError(f"claim {self.claim!r} is not a PersistentVolumeClaim name (lowercase letters, digits, "
                             "'-' and '.')")
        if self.host_path is not None and not self.host_path.startswith("/"):
            raise ValueError(f"host_path must be absolute, got {self.host_path!r}")
        if not self.mount_path.startswith("/") or self.mount_path == "/":
            raise ValueError(f"mount_path must be an absolute folder other than /, got {self.mount_path!r}")
        parts = self.folder.split("/")
        if self.folder.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"folder must be a relative path inside the volume without '..', got {self.folder!r}")
        return self

    @property
    def path(self) -> str:
        """The model folder as the pods see it."""
        return f"{self.mount_path.rstrip('/')}/{self.folder}"


class Coordinator(_Strict):
    """``noodle serve --cluster``: one replica that workers join and clients call."""

    port: Port = Field(8000, description="the HTTP port (API, join, heartbeats, /readyz)")
    min_workers: StrictInt | None = Field(None, ge=1, le=10_000,
                                          description="workers to wait for before the first plan (default: every "
                                                      "pool's replicas)")  # fmt: skip
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    served_model_name: StrictStr | None = Field(None, min_length=1, max_length=256)
    concurrency: StrictInt = Field(8, ge=1, le=4096, description="sequences generated at once")
    heartbeat_timeout_s: Annotated[float, Field(strict=True, gt=0.1, le=3600)] = 5.0
    drain_timeout_s: Annotated[float, Field(strict=True, ge=0, le=3600)] = 30.0
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return _labels(value)


class Secrets(_Strict):
    """Secrets the deployment reads (create them first; their values never appear in the manifests)."""

    token: StrictStr = Field(description="Secret holding the cluster token under key `token`; mounted as a file")
    api_key: StrictStr | None = Field(None, description="Secret holding the API key under key `api-key` "
                                                        "(guards /v1/*); none: the API is open")  # fmt: skip

    @field_validator("token", "api_key")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _dns_label(value, "Secret name")


class Pool(_Strict):
    """One worker pool: a StatefulSet of ``replicas`` workers on matching nodes."""

    name: StrictStr = Field(description="the pool's name (part of its pods' names)")
    replicas: StrictInt = Field(1, ge=0, le=1000)
    device: Literal["cpu", "cuda"] = "cpu"
    threads: StrictInt = Field(0, ge=0, le=1024, description="torch CPU threads per worker (0: torch's default); set "
                                                              "it to the pod's CPU limit")  # fmt: skip
    image: StrictStr | None = Field(None, description="this pool's image (e.g. the CUDA build), default: the top-level image")
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, value: dict[str, str]) -> dict[str, str]:
        return _labels(value)

    @field_validator("name")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        return _dns_label(value, "pool name")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        return None if value is None else _check_image(value)

    @property
    def gpu_count(self) -> int:
        """nvidia.com/gpu per pod: a worker drives one device, so 1 on a cuda pool (one replica per GPU), else 0."""
        return 1 if self.device == "cuda" else 0


def _check_image(value: str) -> str:
    if not _IMAGE.match(value) or len(value) > 512:
        raise ValueError(f"{value!r} is not an image reference, e.g. ghcr.io/org/noodle:0.1.0")
    return value


class Deployment(_Strict):
    """The whole deployment file."""

    name: StrictStr = Field("noodle", description="prefix of every object's name")
    namespace: StrictStr | None = Field(None, description="namespace of every object (default: kubectl's)")
    image: StrictStr = Field(description="the noodle image (see the Dockerfile)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    model: ModelVolume
    secrets: Secrets
    coordinator: Coordinator = Field(default_factory=Coordinator)
    worker_port: Port = Field(50051, description="the workers' gRPC port")
    pools: list[Pool] = Field(min_length=1, max_length=64)

    @field_validator("name", "namespace")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else _dns_label(value, "name")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return _check_image(value)

    @field_validator("pools")
    @classmethod
    def _pools(cls, pools: list[Pool], info: ValidationInfo) -> list[Pool]:
        name = info.data.get("name", "noodle")
        seen: set[str] = set()
        for pool in pools:
            if pool.name in seen:
                raise ValueError(f"two pools are named {pool.name!r}; give each pool its own name")
            seen.add(pool.name)
            full = f"{name}-{pool.name}"
            if len(full) > MAX_NAME:
                raise ValueError(f"{full!r} (name + pool name) has {len(full)} characters, at most {MAX_NAME}; "
                                 "shorten name or the pool's name")  # fmt: skip
        total = sum(p.replicas for p in pools)
        if total == 0:
            raise ValueError("every pool has 0 replicas; the coordinator needs at least one worker")
        coordinator = info.data.get("coordinator")
        if coordinator is not None and coordinator.min_workers is not None and coordinator.min_workers > total:
            raise ValueError(f"coordinator.min_workers {coordinator.min_workers} is more than the pools' {total} "
                             "replicas; the first plan would never come")  # fmt: skip
        return pools

    @property
    def total_replicas(self) -> int:
        """Workers over every pool."""
        return sum(p.replicas for p in self.pools)

    @property
    def min_workers(self) -> int:
        """``--min-workers``: the file's, or every pool's replicas."""
        return self.coordinator.min_workers or self.total_replicas


def parse_deployment(data: object, source: str) -> Deployment:
    """Validate parsed YAML; a bad document is one :class:`SpecError` line naming the field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a deployment file is a mapping (name, image, model, secrets, pools), "
                        f"got {type(data).__name__}")  # fmt: skip
    try:
        return Deployment.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(source, exc, schema=SCHEMA_HINT)) from None


def load_deployment(path: str | Path) -> Deployment:
    """Read, parse and validate a deployment file (bounded like every user file: :mod:`noodle.docfile`)."""
    return parse_deployment(load_document(path, "deployment"), str(path))


def deployment_json_schema() -> dict[str, object]:
    """The deployment file's JSON Schema (committed as deploy/deployment.schema.json)."""
    schema = Deployment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "noodle deployment file (noodle deploy kubernetes)"
    return schema


if __name__ == "__main__":
    print(json.dumps(deployment_json_schema(), indent=2))
