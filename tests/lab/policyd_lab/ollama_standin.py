"""A stand-in Ollama: answers GET /api/tags with an empty model list.

Usage: ollama_standin.py PORT. Listens on 127.0.0.1:PORT and prints "ready"
once it does. A plain script (no lab imports), so it runs in any namespace.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _OllamaHandler(BaseHTTPRequestHandler):
    # HTTP/1.1 so nginx and Caddy may keep their upstream connections open.
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/api/tags":
            self._reply(200, {"models": []})
        else:
            self._reply(404, {"error": "not found"})

    def _reply(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def serve_ollama_standin(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), _OllamaHandler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ollama_standin.py PORT")
    serve_ollama_standin(int(sys.argv[1]))
