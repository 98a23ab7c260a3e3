#!/usr/bin/env bash
# Install the outside tools that Strata's end-to-end tests and perf scripts drive:
#   fio, nbdinfo/nbdcopy (libnbd-bin), nbdkit, qemu-img/qemu-io/qemu-nbd (qemu-utils),
#   qemu-storage-daemon, and the Python `qemu.qmp` library.
# Idempotent: installs only what is missing, runs `apt-get update` only when something
# has to be installed, and prints what it installed. Non-interactive; sudo only if not root.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

PYTHON=${PYTHON:-python3}

log() { printf 'install-deps: %s\n' "$*"; }

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

# Debian package version of $1: the installed one, else apt's candidate (empty if unknown).
pkg_version() {
    if pkg_installed "$1"; then
        dpkg-query -W -f='${Version}' "$1"
    else
        apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
    fi
}

# qemu-storage-daemon moved from qemu-system-common to qemu-utils in Debian's
# 1:8.0+dfsg-5 (bookworm's 7.2 ships it in qemu-system-common; the 10.0 backport and
# trixie in qemu-utils).
qsd_package() {
    local v
    v=$(pkg_version qemu-utils)
    if [ -n "$v" ] && dpkg --compare-versions "$v" ge '1:8.0+dfsg-5~'; then
        echo qemu-utils
    else
        echo qemu-system-common
    fi
}

declare -a INSTALL=() REINSTALL=()
add_pkg() {
    local pkg=$1 p
    for p in "${INSTALL[@]}" "${REINSTALL[@]}"; do
        [ "$p" = "$pkg" ] && return 0
    done
    if pkg_installed "$pkg"; then
        REINSTALL+=("$pkg") # installed, yet the command is gone: put its files back
    else
        INSTALL+=("$pkg")
    fi
}

need_cmd() { # need_cmd COMMAND PACKAGE
    if ! command -v "$1" >/dev/null 2>&1; then
        log "missing $1 (package $2)"
        add_pkg "$2"
    fi
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update -qq
        apt_updated=1
    fi
}

# --- Debian packages -----------------------------------------------------------------
need_cmd fio fio
need_cmd nbdinfo libnbd-bin
need_cmd nbdcopy libnbd-bin
need_cmd nbdkit nbdkit
need_cmd qemu-img qemu-utils
need_cmd qemu-io qemu-utils
need_cmd qemu-nbd qemu-utils
if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
    # The candidate version is only known after an update on a fresh machine.
    [ -n "$(pkg_version qemu-utils)" ] || apt_update_once
    need_cmd qemu-storage-daemon "$(qsd_package)"
fi
need_cmd "$PYTHON" python3

installed=()
if [ "${#INSTALL[@]}" -gt 0 ] || [ "${#REINSTALL[@]}" -gt 0 ]; then
    apt_update_once
    if [ "${#INSTALL[@]}" -gt 0 ]; then
        log "apt-get install ${INSTALL[*]}"
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${INSTALL[@]}"
        installed+=("${INSTALL[@]}")
    fi
    if [ "${#REINSTALL[@]}" -gt 0 ]; then
        log "apt-get install --reinstall ${REINSTALL[*]}"
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends --reinstall "${REINSTALL[@]}"
        installed+=("${REINSTALL[@]}")
    fi
fi

# Verify: every command must now exist.
for cmd in fio nbdinfo nbdcopy nbdkit qemu-img qemu-io qemu-nbd qemu-storage-daemon "$PYTHON"; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        log "ERROR: $cmd still missing after install" >&2
        exit 1
    fi
done

# --- Python: qemu.qmp (PyPI) -----------------------------------------------------------
if ! "$PYTHON" -c 'import qemu.qmp' >/dev/null 2>&1; then
    log "missing python module qemu.qmp for $(command -v "$PYTHON")"
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        apt_update_once
        log "apt-get install python3-pip"
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends python3-pip
        installed+=(python3-pip)
    fi
    pip_install=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input)
    if [ "$(id -u)" -ne 0 ] && [ -z "${VIRTUAL_ENV:-}" ] && ! [ -w "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" ]; then
        pip_install+=(--user)
    fi
    log "pip install qemu.qmp"
    # A Debian-managed interpreter (PEP 668) refuses plain installs; this is a test
    # machine, so fall back to --break-system-packages there.
    pip_err=$(mktemp)
    if ! "${pip_install[@]}" qemu.qmp 2>"$pip_err"; then
        if grep -q externally-managed "$pip_err"; then
            "${pip_install[@]}" --break-system-packages qemu.qmp
        else
            cat "$pip_err" >&2
            rm -f "$pip_err"
            exit 1
        fi
    fi
    rm -f "$pip_err"
    "$PYTHON" -c 'import qemu.qmp'
    installed+=("qemu.qmp (pip)")
fi

# The Rust toolchain is the machine's own (rustup); only report what is absent.
for tool in "cargo" "cargo fmt" "cargo clippy"; do
    # shellcheck disable=SC2086 # word splitting of "cargo fmt" is intended
    if ! $tool --version >/dev/null 2>&1; then
        log "WARNING: '$tool' is not available (rustup component add rustfmt clippy)" >&2
    fi
done

if [ "${#installed[@]}" -gt 0 ]; then
    log "installed: ${installed[*]}"
else
    log "nothing to install: all dependencies present"
fi
