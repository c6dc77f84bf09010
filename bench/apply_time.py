"""Apply time of a policy with a large allowlist, as `policyd apply` takes it, in a namespace.

Owns one throwaway namespace, the first apply (nothing loaded), a re-apply over
the same 100k networks, and a check that the kernel holds every network.
"""
import json
import time
from pathlib import Path

from netlab import Lab
from policyd_daemon import write_policy

TABLE = "policyd"


def _apply(host, policy):
    started = time.perf_counter()
    out = host.policyd("apply", policy, "--force", timeout=300)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"policyd apply failed: {out.stderr.strip()}")
    return round(seconds, 2)


def _loaded_networks(host):
    """Networks in the proxy service's allow sets, as `nft -j` lists them (over
    netlink an interval may be two elements, depending on the kernel)."""
    out = host.nft("-j", "list", "table", "inet", TABLE)
    count = 0
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item and "_proxy_v" in item["set"]["name"]:
            count += len(item["set"].get("elem", []))
    return count


def measure_apply(workdir, networks=100000):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir)
    try:
        host = lab.host("srv")
        log = workdir / "error.log"
        log.write_text("")
        policy = write_policy(workdir / "allow.yaml", log, allow_count=networks)
        first = _apply(host, policy)
        again = _apply(host, policy)
        loaded = _loaded_networks(host)
        if loaded != networks:
            raise RuntimeError(f"applied {networks} networks, the kernel holds {loaded}")
        return {"networks": networks, "first_apply_seconds": first, "reapply_seconds": again,
                "kernel_networks": loaded}
    finally:
        lab.close()
