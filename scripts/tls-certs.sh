#!/usr/bin/env bash
# Throwaway TLS material for the private test brokers (scripts/mosquitto.sh, scripts/redis.sh).
#
#   scripts/tls-certs.sh DIR    create, unless already there, in DIR:
#       ca.pem, ca.key          a test CA (10 years, never trusted by anything else)
#       server.pem, server.key  a server certificate signed by it for 127.0.0.1, ::1, localhost
#       other-ca.pem            a second, unrelated CA: a client trusting only it must refuse
#                               the server (the tests check that verification is on)
#
# Needs the openssl command (installed with apt-get when missing). Keys are unencrypted and
# readable by the broker: for tests only.
set -euo pipefail

DIR=${1:?usage: $0 DIR}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v openssl >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "openssl not found and no apt-get to install it"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install openssl"
        sudo=sudo
    fi
    printf '==> installing openssl with apt-get\n' >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi

mkdir -p "$DIR"
cd "$DIR"
[ -s ca.pem ] && [ -s server.pem ] && [ -s server.key ] && [ -s other-ca.pem ] && exit 0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
quiet() { "$@" >"$tmp/openssl.log" 2>&1 || { cat "$tmp/openssl.log" >&2; die "openssl failed: $*"; }; }

quiet openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Warren test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/ca.key" -out "$tmp/ca.pem"
quiet openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tmp/server.key" -out "$tmp/server.csr"
cat >"$tmp/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost
EXT
quiet openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tmp/server.ext" -out "$tmp/server.pem"
quiet openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Unrelated test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$tmp/other-ca.key" -out "$tmp/other-ca.pem"
chmod 644 "$tmp/server.key"
mv "$tmp/ca.key" "$tmp/ca.pem" "$tmp/server.key" "$tmp/server.pem" "$tmp/other-ca.pem" .
