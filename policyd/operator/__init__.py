"""The operator side: the CLI, the control socket, status, bans, explain, doctor,
metrics."""
