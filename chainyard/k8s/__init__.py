"""`chainyard deploy k8s`: Kubernetes manifests rendered from the one TOML config.

`render` builds the objects (plain dicts), `cli` is the command. docs/KUBERNETES.md says what
is rendered and why.
"""
