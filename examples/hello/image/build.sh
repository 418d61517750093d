#!/usr/bin/env bash
# Builds the sample app's image locally (no registry here): a busybox-static root file system,
# the hello-app script and the static dstack-key client, imported into podman as IMAGE.
# Skips the work when the image already holds these exact inputs (label dstack.tee.inputs).
set -euo pipefail
IMAGE="${1:-localhost/dstack-hello:latest}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
inputs="$(cat "$HERE/dstack-key.c" "$HERE/hello-app" "$HERE/build.sh" /bin/busybox | sha256sum | cut -c1-32)"
if [[ "$(podman image inspect --format '{{ index .Labels "dstack.tee.inputs" }}' "$IMAGE" 2>/dev/null)" == "$inputs" ]]; then
  echo "image $IMAGE: up to date"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/www" "$work/root/tmp" "$work/root/var/run"
cp /bin/busybox "$work/root/bin/busybox"
for applet in sh httpd sed cut sha256sum printf cat mkdir echo env ls; do ln -s busybox "$work/root/bin/$applet"; done
gcc -static -O2 -o "$work/root/bin/dstack-key" "$HERE/dstack-key.c"
install -m 0755 "$HERE/hello-app" "$work/root/bin/hello-app"
tar -C "$work/root" -cf "$work/root.tar" .
podman import -q --change 'CMD ["/bin/hello-app"]' --change 'ENV PATH=/bin' \
  --change "LABEL dstack.tee.inputs=$inputs" "$work/root.tar" "$IMAGE" >/dev/null
echo "image $IMAGE: built"
