#!/bin/sh
# The browser of the dashboard's browser tests: Debian's chromium and its WebDriver.
#   chromium.sh install   install them with apt when missing (apt-get update first)
set -eu
case "${1:-install}" in
install)
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        exit 0
    fi
    echo "installing chromium and chromium-driver for the browser tests (apt)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
    ;;
*)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac
