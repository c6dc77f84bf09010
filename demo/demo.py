#!/usr/bin/env python3
"""`make demo`: policyd guarding Ollama behind nginx, in a throwaway world of namespaces.

Owns the narrated tour: a server (stand-in Ollama on 127.0.0.1:11434, nginx with
basic auth on 8080), a trusted client and an attacker; the shipped
ollama-behind-proxy policy, the daemon banning the attacker, and a trial that
would lock the trusted client out undoing itself. Every step is checked; the
world is removed at the end whatever happens. Exit 0 only if all went as told.
"""
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from policyd_lab.netlab import POLICYD, Lab, leftover_namespaces, wait_for  # noqa: E402
from policyd_lab.proxies import start_nginx, start_ollama_standin  # noqa: E402
from policyd_lab.webclient import KeepAlive, http_get, open_connection  # noqa: E402

SERVER, TRUSTED = "192.0.2.1", "192.0.2.10"
SERVER_WAN, ATTACKER = "198.51.100.1", "198.51.100.66"
CREDENTIALS = ("ollama", "secret")
WRONG = ("admin", "letmein")
SHIPPED_POLICY = REPO / "policies" / "ollama-behind-proxy.yaml"
SHIPPED_LOG = "/var/log/nginx/access.log"
TRIAL_SECONDS = 5
# Seconds between steps, so a person can read along; DEMO_PAUSE=0 runs it flat out.
PAUSE = float(os.environ.get("DEMO_PAUSE", "1.5"))


class DemoFailed(Exception):
    """A step did not behave as the narration says."""


def header(text):
    time.sleep(PAUSE)
    print(f"\n==> {text}", flush=True)


def say(text):
    print(f"    {text}", flush=True)


def expect(condition, what):
    if not condition:
        raise DemoFailed(what)


class Demo:
    def __init__(self, workdir):
        self.work = Path(workdir)
        self.lab = Lab(self.work)
        self.daemon = None
        self.daemon_log = self.work / "policyd.log"

    # ---------------------------------------------------------------- plumbing

    def policyd(self, *args, show=True):
        """The real CLI in the server namespace, with the demo's own state dirs.

        SSH_CONNECTION is dropped so the lint sees this world only, not the
        session you ran the demo from.
        """
        env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
        env.update(self.lab.policyd_env(self.server))
        if show:
            print(f"    $ policyd {shlex.join(str(a) for a in args)}", flush=True)
        out = subprocess.run(["ip", "netns", "exec", self.server.name, *POLICYD, *args], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        if show:
            for line in (out.stdout + out.stderr).strip().splitlines():
                print(f"      {line}", flush=True)
        return out

    def get(self, host, address, auth, timeout=2.0):
        return http_get(host, f"http://{address}:8080/api/tags", auth=auth, timeout=timeout)

    # ---------------------------------------------------------------- the steps

    def build_world(self):
        header("Building a throwaway world of network namespaces")
        self.server = self.lab.host("server")
        self.trusted = self.lab.host("trusted")
        self.attacker = self.lab.host("attacker")
        self.lab.link(self.server, self.trusted, [f"{SERVER}/24"], [f"{TRUSTED}/24"],
                      a_ifname="lan0", b_ifname="eth0")
        self.lab.link(self.server, self.attacker, [f"{SERVER_WAN}/24"], [f"{ATTACKER}/24"],
                      a_ifname="wan0", b_ifname="eth0")
        start_ollama_standin(self.server)
        self.nginx = start_nginx(self.server, self.work / "nginx", users=dict([CREDENTIALS]),
                                 error_log_level="error")
        say(f"{self.server.name}: stand-in Ollama on 127.0.0.1:11434, nginx with basic auth on :8080")
        say(f"{self.trusted.name}: {TRUSTED}, knows the password")
        say(f"{self.attacker.name}: {ATTACKER}, guesses passwords")
        say("nothing here touches this machine's own network or firewall")

    def apply_policy(self):
        header("Applying the shipped policy policies/ollama-behind-proxy.yaml")
        text = SHIPPED_POLICY.read_text()
        expect(SHIPPED_LOG in text, f"{SHIPPED_POLICY} no longer names {SHIPPED_LOG}")
        self.policy = self.work / "ollama-behind-proxy.yaml"
        self.policy.write_text(text.replace(SHIPPED_LOG, str(self.nginx.access_log)))
        say(f"(a copy whose log path is this nginx's access.log: {self.nginx.access_log})")
        say("11434 from loopback only; 8080 open to all; 5 failed logins in 10 minutes => banned")
        out = self.policyd("apply", self.policy)
        expect(out.returncode == 0, f"policyd apply failed: {out.stderr.strip()}")

    def start_daemon(self):
        header("Starting the daemon (`policyd run`), which follows nginx's access.log")
        env = {k: v for k, v in os.environ.items() if k != "SSH_CONNECTION"}
        env.update(self.lab.policyd_env(self.server))
        with open(self.daemon_log, "wb") as log:
            self.daemon = self.server.popen(*POLICYD, "run", str(self.policy), env=env, cwd=REPO,
                                            stdout=subprocess.DEVNULL, stderr=log)
        started = wait_for(lambda: self.daemon.poll() is not None or "started " in self.log(), 20)
        expect(started and self.daemon.poll() is None,
               f"the daemon did not start:\n{self.log()[-2000:]}")
        self.show_log_lines("started ")

    def log(self):
        return self.daemon_log.read_text(errors="replace")

    def show_log_lines(self, marker):
        lines = [line for line in self.log().splitlines() if marker in line]
        for line in lines:
            say(f"daemon log: {line}")
        return lines

    def trusted_gets_through(self, why):
        status = self.get(self.trusted, SERVER, CREDENTIALS)
        say(f"trusted client, right password: GET /api/tags -> HTTP {status}  ({why})")
        expect(status == 200, f"the trusted client got {status}, not 200")

    def attacker_gets_banned(self):
        header("The trusted client uses Ollama through nginx")
        self.trusted_gets_through("nginx asked Ollama")
        header("The attacker guesses passwords")
        for attempt in range(1, 6):
            status = self.get(self.attacker, SERVER_WAN, WRONG)
            say(f"attempt {attempt}: user {WRONG[0]!r}, password {WRONG[1]!r} -> HTTP {status}")
            expect(status == 401, f"wrong password {attempt} got {status}, not 401")
        banned = wait_for(lambda: f"ban addr={ATTACKER}/32" in self.log(), 5)
        expect(banned, f"no ban for {ATTACKER} in the daemon's log:\n{self.log()[-2000:]}")
        say("nginx wrote 5 failures to its access.log; the daemon read them at once:")
        self.show_log_lines(" ban addr=")
        out = self.policyd("bans")
        expect(out.returncode == 0 and out.stdout.startswith(f"{ATTACKER}/32"),
               f"`policyd bans` does not list {ATTACKER}/32: {out.stdout!r}")

    def attacker_times_out(self):
        header("The attacker tries again: the server no longer answers it")
        started = time.monotonic()
        sock = open_connection(self.attacker, SERVER_WAN, 8080, timeout=2.0)
        waited = time.monotonic() - started
        if sock is not None:
            sock.close()
        say(f"attacker connects to {SERVER_WAN}:8080 -> "
            + ("connected (!)" if sock else f"no answer, gave up after {waited:.1f} s (dropped)"))
        expect(sock is None, "the banned attacker could still connect")
        self.trusted_gets_through("a ban is per source")

    def trial_undoes_itself(self):
        header("A risky change on trial: open 8080 to 203.0.113.0/24 only (the trusted client is not in it)")
        self.lockout = self.work / "lockout.yaml"
        self.lockout.write_text(self.policy.read_text().replace(
            "    allow: [any]", "    allow: [203.0.113.0/24]"))
        expect(self.lockout.read_text() != self.policy.read_text(),
               "could not derive the lockout policy from the shipped one")
        say("the trusted client holds a connection open; the lint sees that it would be cut:")
        with KeepAlive(self.trusted, SERVER, 8080, timeout=2.0) as held:
            expect(held.get("/api/tags", CREDENTIALS) == 200, "the held connection did not work")
            refused = self.policyd("apply", self.lockout, "--confirm-timeout", str(TRIAL_SECONDS))
        expect(refused.returncode != 0 and "refusing" in refused.stderr,
               f"the lint did not refuse the lockout policy: {refused.stdout}{refused.stderr}")
        say("the lint refused, as it should. We insist with --force, on a "
            f"{TRIAL_SECONDS}-second trial, and then confirm nothing:")
        out = self.policyd("apply", self.lockout, "--confirm-timeout", str(TRIAL_SECONDS), "--force")
        expect(out.returncode == 0 and "on trial" in out.stdout, f"the trial did not start: {out.stderr}")
        deadline = time.monotonic() + TRIAL_SECONDS
        status = self.get(self.trusted, SERVER, CREDENTIALS, timeout=1.0)
        say(f"trusted client now: GET /api/tags -> {'HTTP ' + str(status) if status else 'no answer'} "
            "(locked out, as the new policy says)")
        expect(status is None, f"the trusted client still got {status} under the lockout policy")

        header(f"Nobody confirms. The kernel holds the deadline; waiting {TRIAL_SECONDS} s ...")
        while (left := deadline - time.monotonic()) > 0.05:
            say(f"{math.ceil(left)} s left on the trial; the trusted client is still locked out")
            time.sleep(left - math.floor(left) if left % 1 > 0.05 else min(1.0, left))
        back = wait_for(lambda: self.get(self.trusted, SERVER, CREDENTIALS, timeout=0.5) == 200, 10, 0.2)
        late = time.monotonic() - deadline
        expect(back, "the trusted client did not get back in after the deadline")
        say(f"the previous policy came back by itself, {late:.1f} s after the deadline")
        self.trusted_gets_through("the committed policy is in force again")
        still_banned = open_connection(self.attacker, SERVER_WAN, 8080, timeout=1.0)
        expect(still_banned is None, "the trial lifted the attacker's ban")
        say("the attacker is still banned: bans live in their own table, which no apply replaces")
        settled = wait_for(lambda: self._policy_status()["trial"] is None, 5, 0.2)
        committed = self._policy_status()["committed"] or {}
        expect(settled and committed.get("source") == str(self.policy),
               f"after the deadline the committed policy is {committed}, with a trial left: {not settled}")
        self.policyd("status")

    def _policy_status(self):
        out = self.policyd("status", "--json", show=False)
        expect(out.returncode == 0, f"policyd status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)["policy"]

    def run(self):
        self.build_world()
        self.apply_policy()
        self.start_daemon()
        self.attacker_gets_banned()
        self.attacker_times_out()
        self.trial_undoes_itself()

    def close(self):
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.lab.close()
        return not leftover_namespaces(self.lab.prefix)


def main():
    if os.geteuid() != 0:
        sys.exit("make demo needs root: it creates network namespaces (run it with sudo)")
    for tool in ("ip", "nft", "nginx", "htpasswd"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"make demo needs `{tool}`: run `make setup` first")
    workdir = tempfile.mkdtemp(prefix="policyd-demo-")
    demo = Demo(workdir)
    failure = None
    try:
        demo.run()
    except DemoFailed as exc:
        failure = str(exc)
    except Exception as exc:  # a broken world is a failed demo too, reported the same way
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        header("Cleaning up: stopping the daemon, removing every namespace")
        clean = demo.close()
        subprocess.run(["rm", "-rf", workdir], check=False)
        say("done, nothing left behind" if clean else "some namespaces could not be removed")
    if failure or not clean:
        print(f"\ndemo FAILED: {failure or 'namespaces left behind'}", file=sys.stderr)
        return 1
    print("\nAll steps behaved as described.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
