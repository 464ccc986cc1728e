#!/usr/bin/env bash
# Install, from Debian's packages, the programs some checks run, if any is missing.
#   scripts/install-tools.sh          the servers the tests start themselves: prometheus and
#                                     promtool (rules, dashboard), nginx (scale-out), kubectl,
#                                     redis-server (the feedback store's Redis backend)
#   scripts/install-tools.sh image    what `make image` and `make image-test` need: podman
#                                     (with runc and its networking), podman-compose, debootstrap
set -euo pipefail

declare -A package=(
    [prometheus]=prometheus
    [promtool]=prometheus
    [nginx]=nginx-light
    [kubectl]=kubernetes-client
    [redis-server]=redis-server
    [podman]=podman
    [runc]=runc
    [podman-compose]=podman-compose
    [debootstrap]=debootstrap
    [iptables]=iptables
)
case "${1:-test}" in
    test) tools=(prometheus promtool nginx kubectl redis-server) ;;
    # runc: crun refuses to set rlimits in some sandboxes (deploy/podman/containers.conf);
    # iptables: netavark publishes a pod's ports with it.
    image) tools=(podman runc podman-compose debootstrap iptables) ;;
    *) echo "usage: $0 [test|image]" >&2; exit 2 ;;
esac

missing=()
for tool in "${tools[@]}"; do
    if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1; then
        missing+=("${package[$tool]}")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

# One package may serve two tools.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-tools: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-tools: missing ${missing[*]}, and no apt-get to install them with" >&2
    exit 1
fi
echo "install-tools: installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# With their recommended packages: podman's include its overlay storage and networking
# helpers. The tests start their own servers, on ports of their own; none of the packages'
# services is needed.
"${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
