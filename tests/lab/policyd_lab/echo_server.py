"""A stand-in service for namespace tests: greets each TCP connection, echoes lines.

Usage: echo_server.py PORT [tcp|udp]. Listens on every IPv4 and IPv6 address
and prints "ready" once it does, so the caller knows when to connect.
"""
import socket
import socketserver
import sys


class Greeter(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"hello\n")
        for line in self.rfile:
            self.wfile.write(line)


class DualStackTCP(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    # The default backlog of 5 drops SYNs under a tight connect loop, which
    # would read as a firewall that let a connection fail.
    request_queue_size = 512

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_udp(port):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def main():
    port = int(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "udp":
        serve_udp(port)
        return
    server = DualStackTCP(("::", port), Greeter)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
