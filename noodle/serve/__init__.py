"""``noodle serve``: the OpenAI-compatible coordinator, and the cluster it plans over (see docs/serving.md, docs/cluster.md)."""
