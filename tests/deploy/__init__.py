"""Deploy tests: the Kubernetes manifests, compose, the observability kit, the packages."""
