#!/usr/bin/env bash
# Install, from Debian's packages, the servers that the tests start themselves, if missing:
# prometheus + promtool (the rules and the dashboard), nginx (scale-out), kubectl (kustomize).
set -euo pipefail

declare -A package=(
    [prometheus]=prometheus
    [promtool]=prometheus
    [nginx]=nginx-light
    [kubectl]=kubernetes-client
)
missing=()
for tool in prometheus promtool nginx kubectl; do
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
# The tests start their own servers, on ports of their own; none of these services is needed.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
