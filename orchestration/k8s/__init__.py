"""AFD on Kubernetes: cluster config, manifest rendering, overlays, kustomize tree, API client, `afd k8s` CLI."""
