"""Servers and clients for tests/mesh_netns.rs: unmodified programs, run inside network
namespaces, that know nothing of Spur.

Servers:  http NAME HOST PORT            answers every GET with "NAME x-bad=<header or ->"
          serve-greet HOST PORT          speaks first ("GREETING"), then echoes lines
          serve-tls HOST PORT CERT KEY   TLS; answers "tls-ok <line>" to one line
Clients:  get URL N [NAME:VALUE]...  N GETs; prints a JSON count of answers by body
          greet HOST PORT            reads the greeting, sends "ping", prints both
          tls HOST PORT SNI CA       handshakes (verifying SNI against CA), prints the answer
          put URL BODY               PUT (YAML body); prints the answer, error or not
"""
import http.server, json, socket, socketserver, ssl, sys, threading, urllib.request, urllib.error


def serve_http(name, host, port):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{name} x-bad={self.headers.get('x-bad', '-')}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer((host, int(port)), H).serve_forever()


def serve_greet(host, port):
    class H(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"GREETING\n")
            for line in self.rfile:
                self.wfile.write(line)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer((host, int(port)), H).serve_forever()


def serve_tls(host, port, cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(16)
    while True:
        c, _ = s.accept()

        def one(c=c):
            try:
                t = ctx.wrap_socket(c, server_side=True)
                line = t.makefile("rb").readline().strip()
                t.sendall(b"tls-ok " + line + b"\n")
                t.close()
            except Exception:
                c.close()

        threading.Thread(target=one, daemon=True).start()


def get(url, n, headers):
    counts = {}
    for _ in range(int(n)):
        req = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                key = r.read().decode()
        except urllib.error.HTTPError as e:
            key = f"{e.code} {e.headers.get('x-spur-error', '')}"
        except Exception as e:
            key = f"error {type(e).__name__}"
        counts[key] = counts.get(key, 0) + 1
    print(json.dumps(counts))


def greet(host, port):
    s = socket.create_connection((host, int(port)), timeout=5)
    f = s.makefile("rwb")
    first = f.readline().decode().strip()
    f.write(b"ping\n")
    f.flush()
    echo = f.readline().decode().strip()
    print(f"{first} {echo}")


def tls(host, port, sni, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as t:
            t.sendall(b"hello\n")
            print(t.makefile("rb").readline().decode().strip())


def put(url, body):
    req = urllib.request.Request(url, data=body.encode(), method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            print(r.read().decode())
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode())


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "http":
        serve_http(*args)
    elif mode == "serve-greet":
        serve_greet(*args)
    elif mode == "serve-tls":
        serve_tls(*args)
    elif mode == "get":
        hs = dict(h.split(":", 1) for h in args[2:])
        get(args[0], args[1], hs)
    elif mode == "greet":
        greet(*args)
    elif mode == "tls":
        tls(*args)
    elif mode == "put":
        put(*args)
