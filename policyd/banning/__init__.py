"""Failures -> bans -> kernel and state: the failure window, the ban book with
escalation, the write queues, the state database."""
