"""Bans shared across boxes over Redis Streams."""
