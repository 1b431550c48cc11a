#!/bin/bash
# The image's healthcheck: GET /healthz on the instance's REST API (TRIBUNAL_HTTP's port)
# and succeed on 200. Plain bash (/dev/tcp), so the image needs no HTTP client.
port=${TRIBUNAL_HTTP##*:}
exec 3<>"/dev/tcp/127.0.0.1/${port:-8080}" || exit 1
printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
read -r -t 2 _ status _ <&3 || exit 1
[ "${status%$'\r'}" = 200 ]
