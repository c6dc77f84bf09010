"""The ruleset model the compiler builds from a policy, and what reads it without a
kernel: nft text, set elements, explain's walk."""
