"""Deployment files and what they render to (``noodle deploy kubernetes``); pure Python, no torch."""

from __future__ import annotations

from noodle.deploy.kubernetes import render, to_yaml
from noodle.deploy.model import Deployment, Pool, load_deployment, parse_deployment

__all__ = ["Deployment", "Pool", "load_deployment", "parse_deployment", "render", "to_yaml"]
