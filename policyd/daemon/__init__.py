"""The daemon: one main loop that owns all state, its worker, and its log, policy and
control sides."""
