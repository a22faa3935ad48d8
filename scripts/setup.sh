# shellcheck shell=bash
# What scripts/test and scripts/demo share: Debian packages and the .venv.
# Sourced from the repository's root.

log() { printf '==> %s\n' "$*" >&2; }

# install_packages WHAT PKG...: the Debian packages that are missing, when
# running as root on Debian; otherwise say what is missing and go on.
install_packages() {
    local what=$1
    shift
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        log "not root or not Debian: not installing ${missing[*]} ($what that need them will skip or fail)"
        return
    fi
    log "installing Debian packages for $what: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# make_venv [EXTRAS]: .venv with blockrepl (editable) and its EXTRAS, created once.
make_venv() {
    local extras=${1:-}
    local python=${PYTHON:-python3}
    if [[ ! -x .venv/bin/python ]]; then
        log "creating .venv with $($python --version)"
        "$python" -m venv .venv
    fi
    log "installing blockrepl${extras:+ with its $extras extras} into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
}
