# shellcheck shell=bash disable=SC2034
# The servers of a run: the nginx origin, and each proxy under test with its generated
# config (Spur, Spur's mesh hops, HAProxy, nginx as a reverse proxy). Sourced by run.sh and
# profile.sh after common.sh. Every config gives the proxy PROXY_WORKERS workers and, when
# the access log is on, one line per request written to a file in the run directory.
#
# start_target KIND TAG LOG [SPUR_BIN] starts one proxy on the proxy CPUs and sets T_PID,
# T_URL (HTTP/1.1), T_H2URL (h2c with prior knowledge; empty where the proxy cannot serve
# it: T_H2NOTE says why) and T_LOGFILE (where its access log goes).

NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)

BODY_TEXT="spur bench origin: a fixed 100-byte body served by nginx return 200, keep-alive on, for wrk."
BODY_TEXT=$(printf '%-99.99s' "$BODY_TEXT")   # 99 chars + "\n" = 100 bytes

nginx_temp_paths() {   # DIR
  cat <<EOF
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

# start_origin : the HTTP/1.1 origin every target forwards to (nginx, one worker, fixed
# 100-byte body, no access log), on the load CPUs; sets ORIGIN_PID and ORIGIN_PORT.
start_origin() {
  local dir=$WORK/origin
  printf '%s\n' "$BODY_TEXT" >"$WORK/expected.body"
  free_port ORIGIN_PORT
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# origin: fixed 100-byte 200 response, HTTP/1.1 keep-alive
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $RUN_DIR/origin.error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$(nginx_temp_paths "$dir")
    server {
        listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
        location / {
            default_type text/plain;
            return 200 "$BODY_TEXT\n";
        }
    }
}
EOF
  cp "$dir/nginx.conf" "$RUN_DIR/origin-nginx.conf"
  start_proc origin "${ON_LOAD_CPUS[@]}" "$NGINX_BIN" -e "$RUN_DIR/origin.error.log" -p "$dir" -c "$dir/nginx.conf"
  ORIGIN_PID=$LAST_PID
  wait_ok origin "http://127.0.0.1:$ORIGIN_PORT/" "$ORIGIN_PID" || die "origin nginx did not start (see $RUN_DIR/origin.*.log)"
}

# ------------------------------------------------------------------- Spur --
declare -A SPUR_WORKERS_KEY=()
# spur_workers_line BIN : "workers: N" when this binary's config accepts it (checked once
# with `spur validate`), else nothing: TOKIO_WORKER_THREADS is set in both cases.
spur_workers_line() {
  local bin=$1
  if [[ -z ${SPUR_WORKERS_KEY[$bin]:-} ]]; then
    printf '%s\n' 'workers: 1' 'listeners:' '  - { name: l, listen: "127.0.0.1:1", protocol: http, cluster: c }' \
      'clusters:' '  - { name: c, endpoints: ["127.0.0.1:2"] }' >"$WORK/workers-probe.yaml"
    if "$bin" validate "$WORK/workers-probe.yaml" >"$WORK/workers-probe.out" 2>&1; then
      SPUR_WORKERS_KEY[$bin]=yes
    else
      SPUR_WORKERS_KEY[$bin]=no
    fi
  fi
  [[ ${SPUR_WORKERS_KEY[$bin]} == yes ]] && echo "workers: $PROXY_WORKERS"
  return 0
}

write_spur_conf() {   # FILE PORT ADMIN_PORT BIN
  cat >"$1" <<EOF
# Spur: one HTTP listener (HTTP/1.1 and h2c) forwarding everything to the origin cluster
$(spur_workers_line "$4")
admin:
  listen: 127.0.0.1:$3
listeners:
  - name: bench
    listen: 127.0.0.1:$2
    protocol: http
    cluster: origin
clusters:
  - name: origin
    endpoints: ["127.0.0.1:$ORIGIN_PORT"]
    lb: round_robin
EOF
}

# make_mesh_certs DIR : a CA, and ECDSA P-256 workload certificates for the two sides of the
# mesh hop, with SPIFFE URI SANs (plus localhost / 127.0.0.1) and client+server auth.
make_mesh_certs() {
  local dir=$1 side
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=spur-bench-ca -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl: CA"; }
  for side in outbound inbound; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/CN=$side" -keyout "$dir/$side.key" -out "$dir/$side.csr" >>"$dir/openssl.log" 2>&1 \
      || { cat "$dir/openssl.log" >&2; die "openssl: $side key"; }
    printf '%s\n' \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth,clientAuth" \
      "subjectAltName=URI:spiffe://bench.local/ns/bench/sa/$side,DNS:localhost,IP:127.0.0.1" \
      >"$dir/$side.ext"
    openssl x509 -req -in "$dir/$side.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 2 -extfile "$dir/$side.ext" -out "$dir/$side.crt" >>"$dir/openssl.log" 2>&1 \
      || { cat "$dir/openssl.log" >&2; die "openssl: $side certificate"; }
  done
}

# write_spur_mesh_conf FILE PORT ADMIN_PORT INBOUND_PORT CERT_DIR|"" HOP BIN : the two sides
# of a mesh hop in one process. "bench" (plaintext, what the client calls) forwards to the
# "inbound" listener, which forwards to the origin; with CERT_DIR that hop is mutual TLS with
# SPIFFE identities checked both ways, without it plaintext. HOP: http1, http2 (ALPN h2) or
# http3 (QUIC; the inbound listener is then UDP).
write_spur_mesh_conf() {
  local file=$1 port=$2 admin=$3 inport=$4 dir=$5 hop=$6 bin=$7 ltls="" ctls="" lproto=http
  [[ $hop == http3 ]] && lproto=http3
  if [[ -n $dir ]]; then
    ltls="    tls: { cert: $dir/inbound.crt, key: $dir/inbound.key, client_ca: $dir/ca.crt, allow_identities: [\"spiffe://bench.local/ns/bench/sa/outbound\"] }"
    ctls="    tls: { ca: $dir/ca.crt, cert: $dir/outbound.crt, key: $dir/outbound.key, expect_identities: [\"spiffe://bench.local/ns/bench/sa/inbound\"] }"
  fi
  cat >"$file" <<EOF
# Spur: a mesh hop (outbound side -> inbound side) in one process
$(spur_workers_line "$bin")
admin:
  listen: 127.0.0.1:$admin
listeners:
  - name: bench
    listen: 127.0.0.1:$port
    protocol: http
    cluster: mesh
  - name: inbound
    listen: 127.0.0.1:$inport
    protocol: $lproto
$ltls
    cluster: origin
clusters:
  - name: mesh
    endpoints: ["127.0.0.1:$inport"]
    protocol: $hop
    lb: round_robin
$ctls
  - name: origin
    endpoints: ["127.0.0.1:$ORIGIN_PORT"]
    lb: round_robin
EOF
}

# spur_env LOG : the environment of a Spur process (its access log is the spur::access
# target on stderr, which the run directory's TAG.stderr.log receives).
spur_env() {
  local filter=info
  [[ $1 == off ]] && filter=info,spur::access=off
  echo "SPUR_LOG=$filter" "TOKIO_WORKER_THREADS=$PROXY_WORKERS"
}

# ---------------------------------------------------------------- HAProxy --
write_haproxy_conf() {   # FILE PORT H2_PORT LOG
  local logg="" httplog=""
  if [[ $4 == on ]]; then
    logg="    log stdout format raw local0 info"
    httplog="    option httplog"
  fi
  cat >"$1" <<EOF
# HAProxy: HTTP mode, keep-alive both sides, connection reuse to the origin
global
    nbthread $PROXY_WORKERS
    maxconn 4096
$logg

defaults
    mode http
    log global
$httplog
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$2
    bind 127.0.0.1:$3 proto h2
    default_backend origin

backend origin
    server origin1 127.0.0.1:$ORIGIN_PORT
EOF
}

# ------------------------------------------------------------ nginx proxy --
write_nginx_proxy_conf() {   # DIR PORT H2_PORT ACCESS_LOG_FILE|off
  local dir=$1
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
# reverse proxy with upstream keep-alive; h2c (prior knowledge) on a second port
worker_processes $PROXY_WORKERS;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log $4;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    http2_max_requests 1000000;
$(nginx_temp_paths "$dir")
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }
    server {
        listen 127.0.0.1:$2 backlog=4096;
        listen 127.0.0.1:$3 http2 backlog=4096;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# ------------------------------------------------------------------ start --
# start_target KIND TAG LOG [SPUR_BIN] (see the top of this file). KIND: spur, haproxy,
# nginx, spur-mtls, spur-mtls-h2, spur-h3, spur-2hop. Returns 1 if it did not come up.
start_target() {
  local kind=$1 tag=$2 logmode=$3 bin=${4:-} port h2port admin inport certs hop alog sub=(proxy)
  # The data plane's own binary (spur-proxy, quicker to build) takes no subcommand.
  [[ $(basename "${bin:-spur}") == spur-proxy* ]] && sub=()
  free_port port
  T_PORT=$port; T_URL="http://127.0.0.1:$port/"; T_H2URL=""; T_H2NOTE=""; T_ADMIN=""; T_INPORT=""; T_CERTS=""
  case $kind in
    spur)
      free_port admin; T_ADMIN=$admin
      write_spur_conf "$RUN_DIR/$tag.yaml" "$port" "$admin" "$bin"
      # shellcheck disable=SC2046
      start_proc "$tag" "${ON_PROXY_CPUS[@]}" env -u RUST_LOG $(spur_env "$logmode") \
        "$bin" "${sub[@]}" --config "$RUN_DIR/$tag.yaml"
      T_H2URL=$T_URL
      T_LOGFILE="$RUN_DIR/$tag.stderr.log"
      ;;
    spur-mtls|spur-mtls-h2|spur-h3|spur-2hop)
      free_port admin; free_port inport; T_ADMIN=$admin; T_INPORT=$inport
      certs=""
      if [[ $kind != spur-2hop ]]; then
        certs="$WORK/certs"
        [[ -f $certs/ca.crt ]] || make_mesh_certs "$certs"
      fi
      T_CERTS=$certs
      case $kind in spur-mtls-h2) hop=http2 ;; spur-h3) hop=http3 ;; *) hop=http1 ;; esac
      write_spur_mesh_conf "$RUN_DIR/$tag.yaml" "$port" "$admin" "$inport" "$certs" "$hop" "$bin"
      # shellcheck disable=SC2046
      start_proc "$tag" "${ON_PROXY_CPUS[@]}" env -u RUST_LOG $(spur_env "$logmode") \
        "$bin" "${sub[@]}" --config "$RUN_DIR/$tag.yaml"
      T_LOGFILE="$RUN_DIR/$tag.stderr.log"
      ;;
    haproxy)
      free_port h2port
      write_haproxy_conf "$RUN_DIR/$tag.cfg" "$port" "$h2port" "$logmode"
      "$HAPROXY_BIN" -c -q -f "$RUN_DIR/$tag.cfg" >"$RUN_DIR/$tag.check.log" 2>&1 \
        || { cat "$RUN_DIR/$tag.check.log" >&2; die "haproxy config check failed"; }
      start_proc "$tag" "${ON_PROXY_CPUS[@]}" "$HAPROXY_BIN" -db -f "$RUN_DIR/$tag.cfg"
      T_H2URL="http://127.0.0.1:$h2port/"
      T_LOGFILE="$RUN_DIR/$tag.stdout.log"   # 'log stdout'
      ;;
    nginx)
      free_port h2port
      alog=off
      [[ $logmode == on ]] && alog="$RUN_DIR/$tag.access.log"
      write_nginx_proxy_conf "$WORK/$tag" "$port" "$h2port" "$alog"
      cp "$WORK/$tag/nginx.conf" "$RUN_DIR/$tag.nginx.conf"
      start_proc "$tag" "${ON_PROXY_CPUS[@]}" "$NGINX_BIN" -e "$WORK/$tag/error.log" \
        -p "$WORK/$tag" -c "$WORK/$tag/nginx.conf"
      T_H2URL="http://127.0.0.1:$h2port/"
      T_LOGFILE="$RUN_DIR/$tag.access.log"
      ;;
    *) die "start_target: unknown kind '$kind'" ;;
  esac
  T_PID=$LAST_PID
  wait_ok "$tag" "$T_URL" "$T_PID" || return 1
  if [[ -n $T_H2URL ]] && ! wait_ok "$tag" "$T_H2URL" "$T_PID" h2 20 2>>"$RUN_DIR/$tag.h2-probe.log"; then
    T_H2NOTE="no h2c: $kind did not answer HTTP/2 with prior knowledge (see $tag.h2-probe.log)"
    T_H2URL=""
  fi
  [[ -s $RUN_DIR/$tag.h2-probe.log ]] || rm -f "$RUN_DIR/$tag.h2-probe.log"
  return 0
}

# access_log_lines FILE : lines in a proxy's access log (Spur's stderr also has a few
# start-up lines); the log is then cut to its last 1000 lines unless KEEP_LOGS=1.
access_log_lines() {
  local f=$1 lines
  [[ -f $f ]] || { echo 0; return 0; }
  lines=$(wc -l <"$f")
  if [[ ${KEEP_LOGS:-0} != 1 && $lines -gt 1000 ]]; then
    tail -n 1000 "$f" >"$f.tail" && mv "$f.tail" "$f"
  fi
  echo "$lines"
}
