"""A registry that answers wrongly, for the pull tests: python3 hostile_registry.py SCENARIO PORT_FILE.

Speaks just enough of the OCI distribution protocol for `skopeo` to pull one image
(`/v2/`, a manifest, its config and one layer blob) and breaks it as SCENARIO says:

  wrong-digest        the layer's bytes do not hash to the digest its descriptor names
  short-blob          the layer is cut off after half of the length it announced
  oversized-manifest  the manifest is over 5 MiB
  redirect-loop       the manifest redirects to itself
  unauthorized        every request wants credentials (401 with a Basic challenge)
  slow-blob           the layer trickles, so a pull can be killed mid-transfer

Writes the port it listens on (loopback, chosen by the kernel) to PORT_FILE.
"""

import hashlib
import http.server
import json
import sys
import time

scenario, port_file = sys.argv[1], sys.argv[2]


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


layer = b"layer bytes that are not a tarball " * 4000
config = json.dumps(
    {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    }
).encode()
manifest = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": digest(config),
        "size": len(config),
    },
    "layers": [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(layer),
            "size": len(layer),
        }
    ],
}
if scenario == "oversized-manifest":
    manifest["annotations"] = {"padding": "x" * (5 << 20)}
manifest_bytes = json.dumps(manifest).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", content_type="application/json", length=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        return body

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        path = self.path.split("?")[0]
        if scenario == "unauthorized":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="hostile"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b""
        if path == "/v2/":
            body = self.send(200, b"{}")
        elif "/manifests/" in path:
            if scenario == "redirect-loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", manifest["mediaType"])
            self.send_header("Docker-Content-Digest", digest(manifest_bytes))
            self.send_header("Content-Length", str(len(manifest_bytes)))
            self.end_headers()
            body = manifest_bytes
        elif path.endswith(digest(config)):
            body = self.send(200, config, "application/octet-stream")
        elif path.endswith(digest(layer)):
            if scenario == "wrong-digest":
                body = self.send(200, b"X" * len(layer), "application/octet-stream")
            elif scenario == "short-blob":
                self.send(200, b"", "application/octet-stream", length=len(layer))
                if not head:
                    self.wfile.write(layer[: len(layer) // 2])
                    self.wfile.flush()
                self.close_connection = True
                return
            elif scenario == "slow-blob":
                self.send(200, b"", "application/octet-stream", length=len(layer))
                if not head:
                    for start in range(0, len(layer), 1024):
                        self.wfile.write(layer[start : start + 1024])
                        self.wfile.flush()
                        time.sleep(0.2)
                return
            else:
                body = self.send(200, layer, "application/octet-stream")
        else:
            body = self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
        if not head:
            self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file, "w") as out:
    out.write(str(server.server_address[1]))
server.serve_forever()
