"""``noodle deploy kubernetes FILE``: the manifests of a coordinator and its worker pools, on stdout.

``--format yaml`` (default) writes one multi-document YAML stream for ``kubectl apply -f -``;
``--format json`` a ``v1/List``. The file is validated first (one line naming the field when it is
wrong); see docs/kubernetes.md and ``deploy/examples/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from noodle.deploy import load_deployment, render, to_yaml
from noodle.errors import SpecError

__all__ = ["register", "kubernetes_cmd"]

FORMATS = ("yaml", "json")

deploy_app = typer.Typer(help="Render deployments of a noodle cluster (coordinator + worker pools).",
                         no_args_is_help=True)  # fmt: skip


@deploy_app.command("kubernetes")
def kubernetes_cmd(
    file: Path = typer.Argument(..., help="deployment file (see deploy/examples/)"),
    fmt: str = typer.Option("yaml", "--format", "-f", help="yaml (kubectl apply -f -) or json (a v1 List)"),
) -> None:
    """Kubernetes manifests: coordinator Deployment, Services, one StatefulSet + PDB per pool, NetworkPolicy."""
    if fmt not in FORMATS:
        raise SpecError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    objects = render(load_deployment(file))
    if fmt == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        sys.stdout.write(to_yaml(objects))


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
