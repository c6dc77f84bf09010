"""fail2ban compatibility: filter.d filters read and run by policyd's own code.

config.py reads the files, dates.py cuts the time out of a line, engine.py
matches (the daemon's path; connections.py keeps sshd's connection cache,
multiline.py the maxlines window),
offline.py scans whole files (test-filter), jails.py turns jail.conf and
jail.local into policy lines. No fail2ban code is used.
"""
