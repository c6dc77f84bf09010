"""What talks to nf_tables (libnftables in nft.py only, raw netlink beside it): loads,
trials, reload diffs, ban elements, drift and list sync."""
