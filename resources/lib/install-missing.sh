# Sourced by the build scripts: `install_missing PKG...` installs the Debian packages among PKG that
# are not installed yet (apt-get update first; sudo when not root). Logs through `log` if defined.
install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if declare -F log >/dev/null; then log "installing: ${missing[*]}"; else echo "installing: ${missing[*]}" >&2; fi
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
