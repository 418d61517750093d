#!/usr/bin/env bash
# Builds the notes app's two images as image archives (docker-archive, the format
# `podman save --format docker-archive` writes) from a busybox-static root file system: no
# registry, no container engine and no image store are needed or touched. deploy-app.yml ships
# them (app.yml's images) to the VMM host's podman store when it lacks them.
# The archives are reproducible: the same inputs and names make the same bytes and image IDs.
#   examples/notes/image/build.sh [OUT_DIR [NAME_PREFIX]]
#   -> OUT_DIR/notes-web.tar (NAME_PREFIX-web:latest) and OUT_DIR/notes-store.tar (NAME_PREFIX-store:latest);
#      OUT_DIR defaults to this folder, NAME_PREFIX to localhost/dstack-notes (the compose file's names).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE}"
PREFIX="${2:-localhost/dstack-notes}"
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch="$(uname -m)" ;;
esac
# Every file of an archive: fixed owner, times and order.
pack() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu "$@"; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

for service in web store; do
  name="$PREFIX-$service:latest"
  root="$work/$service/root"
  mkdir -p "$root/bin" "$root/www/cgi-bin" "$root/data" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in sh httpd sed head tr mv rm mkdir touch wc date cat printf echo sleep kill env; do
    ln -s busybox "$root/bin/$applet"
  done
  install -m 0755 "$HERE/notes-$service" "$root/bin/notes-$service"
  install -m 0755 "$HERE/notes-$service.cgi" "$root/www/cgi-bin/index.cgi"
  chmod 1777 "$root/tmp"
  pack -C "$root" -cf "$work/$service/layer.tar" .
  layer="$(sha256sum "$work/$service/layer.tar" | cut -d' ' -f1)"
  # The image config: its SHA-256 is the image ID. The label makes each name's ID its own.
  printf '{"architecture":"%s","config":{"Cmd":["/bin/notes-%s"],"Env":["PATH=/bin"],"Labels":{"dstack.tee.image":"%s"},"WorkingDir":"/"},"created":"1970-01-01T00:00:00Z","os":"linux","rootfs":{"diff_ids":["sha256:%s"],"type":"layers"}}' \
    "$arch" "$service" "$name" "$layer" > "$work/$service/config.json"
  id="$(sha256sum "$work/$service/config.json" | cut -d' ' -f1)"
  mkdir -p "$work/$service/archive"
  mv "$work/$service/config.json" "$work/$service/archive/$id.json"
  mv "$work/$service/layer.tar" "$work/$service/archive/$layer.tar"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s.tar"]}]' "$id" "$name" "$layer" \
    > "$work/$service/archive/manifest.json"
  # Written aside, then renamed: a reader never sees half an archive.
  pack -C "$work/$service/archive" -cf "$OUT/.notes-$service.tar.new" manifest.json "$id.json" "$layer.tar"
  mv "$OUT/.notes-$service.tar.new" "$OUT/notes-$service.tar"
  echo "$OUT/notes-$service.tar: $name, image ID $id"
done
