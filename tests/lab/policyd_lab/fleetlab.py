"""A fleet in namespaces: N policyd nodes, a Redis and an attacker on one bridged network.

Shared by tests/netns/test_fleet_netns.py and bench/fleet_latency.py. A switch
namespace holds the bridge; every other namespace has one eth0 on it (192.0.2.0/24).
redis-server runs in its own namespace without persistence, with one ACL user
per node that may write only its own stream (the README's ACL line).
"""
import json
import os
import signal
import subprocess
import textwrap

from policyd_lab.netlab import PolicydDaemon, in_namespace, run, wait_for

REDIS_V4 = "192.0.2.100"
ATTACKER_V4 = "192.0.2.66"
ATTACKER_EXTRA = [f"192.0.2.{n}" for n in range(67, 90)]
REDIS_PORT = 6379
ADMIN_PASSWORD = "admin-secret"
STREAM_PREFIX = "policyd:{bans}:"

NODE_POLICY = """\
version: 1
services:
  web:
    ports: [8080]
    allow: [any]
  ollama:
    ports: [11434]
    allow: [127.0.0.0/8, "::1"]
bans:
  ports: [8080, 11434]
  maxretry: 3
  bantime: 1h
  ignore: [{ignore}]
  logs: [{logs}]
fleet:
  redis: {scheme}://{node}@{redis_host}:{port}/0
  password_file: {secret}
  node: {node}
{extra}"""


def acl_line(node, password):
    """The ACL of one node, exactly as the README documents it."""
    return (f"user {node} on >{password} resetchannels -@all +ping +time +scan +xadd +xtrim "
            f"+xread +xrange +xinfo|stream +del %RW~{STREAM_PREFIX}{node} "
            f"%R~{STREAM_PREFIX}*")


def node_address(index):
    return f"192.0.2.{index}"


class FleetLab:
    def __init__(self, lab, count=5, tls=False):
        self.lab = lab
        self.tmp = lab.tmp
        self.tls = tls
        self.switch = lab.host("sw")
        run("ip", "-n", self.switch.name, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch.name, "link", "set", "br0", "up")
        self.redis_host = self._attach(lab.host("redis"), [REDIS_V4])
        self.attacker = self._attach(lab.host("attacker"), [ATTACKER_V4, *ATTACKER_EXTRA])
        self.nodes = [self._attach(lab.host(f"n{i}"), [node_address(i)]) for i in range(1, count + 1)]
        self.passwords = {host.role: f"pw-{host.role}-{os.urandom(4).hex()}" for host in self.nodes}
        self.redis = None
        self.daemons = {}
        self.port = 6380 if tls else REDIS_PORT
        if tls:
            self.ca_file = make_tls_files(self.tmp / "tls", REDIS_V4)

    def _attach(self, host, addresses):
        n = len(self.lab.hosts)
        outside, inside = f"{self.lab.prefix}f{n}"[:15], f"{self.lab.prefix}g{n}"[:15]
        run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", outside, "netns", self.switch.name)
        run("ip", "link", "set", inside, "netns", host.name)
        self.switch.ip("link", "set", outside, "master", "br0")
        self.switch.ip("link", "set", outside, "up")
        host.ip("link", "set", inside, "name", "eth0")
        for address in addresses:
            host.ip("addr", "add", f"{address}/24", "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        host.address = addresses[0]
        return host

    # --- Redis ------------------------------------------------------------

    def start_redis(self):
        """A fresh redis-server without persistence: a restart comes back empty."""
        work = self.tmp / "redis"
        work.mkdir(exist_ok=True)
        lines = [f"bind {REDIS_V4}", "save \"\"", "appendonly no", f"dir {work}",
                 "protected-mode no", "daemonize no", "loglevel warning",
                 f"logfile {work}/redis.log", "user default off",
                 f"user admin on >{ADMIN_PASSWORD} ~* &* +@all"]
        lines += [acl_line(node, password) for node, password in self.passwords.items()]
        if self.tls:
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {self.ca_file.parent}/server.pem",
                      f"tls-key-file {self.ca_file.parent}/server.key",
                      f"tls-ca-cert-file {self.ca_file}", "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        conf = work / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.redis = self.redis_host.popen("redis-server", str(conf), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
        if not wait_for(self._redis_up, timeout=10):
            raise RuntimeError("redis-server did not start: " +
                               (work / "redis.log").read_text(errors="replace")[-2000:])

    def _redis_up(self):
        try:
            return self.admin(lambda client: client.ping())
        except Exception:
            return False

    def kill_redis(self):
        self.redis.kill()
        self.redis.wait(timeout=10)

    def client(self, user, password):
        import redis
        kwargs = dict(host=REDIS_V4, port=self.port, username=user, password=password,
                      socket_timeout=5, socket_connect_timeout=2)
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.ca_file), ssl_check_hostname=True)
        return redis.Redis(**kwargs)

    def admin(self, func):
        """func(client) with Redis's admin user, run inside the Redis namespace."""
        return self.as_user(self.redis_host, "admin", ADMIN_PASSWORD, func)

    def as_user(self, host, user, password, func):
        def call():
            client = self.client(user, password)
            try:
                return func(client)
            finally:
                client.close()
        return in_namespace(host.name, call)

    # --- nodes ------------------------------------------------------------

    def policy(self, host, ignore=(), logs="", extra=""):
        secret = self.tmp / f"{host.role}.secret"
        secret.write_text(self.passwords[host.role] + "\n")
        os.chmod(secret, 0o600)
        text = NODE_POLICY.format(ignore=", ".join(ignore), logs=logs, node=host.role,
                                  scheme="rediss" if self.tls else "redis", redis_host=REDIS_V4,
                                  port=self.port, secret=secret, extra=extra)
        if self.tls:
            text += f"  ca_file: {self.ca_file}\n"
        path = self.tmp / f"{host.role}.yaml"
        path.write_text(text)
        return path

    def start_daemons(self, policies):
        """Start a daemon per node (policies: host -> policy path), then wait for all."""
        for host, policy in policies.items():
            self.daemons[host.role] = PolicydDaemon(host, policy).start(ready=False)
        for host in policies:
            self.wait_ready(host)

    def start_daemon(self, host, policy):
        self.daemons[host.role] = PolicydDaemon(host, policy).start(ready=False)
        self.wait_ready(host)

    def wait_ready(self, host):
        daemon = self.daemons[host.role]
        if not wait_for(daemon._up, timeout=30):
            raise RuntimeError(f"{host.role} did not come up:\n" + daemon.stop_and_read())
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"{host.role} died:\n" + daemon.stop_and_read())

    def stop_daemon(self, host, sig=signal.SIGTERM):
        return self.daemons.pop(host.role).stop_and_read(sig)

    def stop_all(self):
        return {role: daemon.stop_and_read() for role, daemon in list(self.daemons.items())}

    def status(self, host):
        out = host.policyd("status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def kernel_bans(self, host):
        """{address: seconds left} of the node's kernel set ban4."""
        out = host.nft("-j", "list", "set", "inet", "policyd_bans", "ban4", check=False).stdout
        found = {}
        for item in json.loads(out or '{"nftables": []}')["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                if isinstance(elem, dict):
                    found[elem["elem"]["val"]] = elem["elem"].get("expires")
                else:
                    found[elem] = None
        return found


def make_tls_files(directory, ip_address):
    """A self-signed CA and a server certificate for `ip_address`, made by openssl; the CA's path."""
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=policyd test CA", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={ip_address}",
            "-keyout", "server.key", "-out", "server.csr")
    (directory / "ext.cnf").write_text(textwrap.dedent(f"""\
        subjectAltName = IP:{ip_address}
        """))
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    os.chmod(directory / "server.key", 0o644)  # redis-server reads it; the lab is root's tmp
    return directory / "ca.pem"
