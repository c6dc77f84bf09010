"""Log -> failures: following files and the journal, filters (policyd's and
fail2ban's), the forged-line guard, line times, the offline scan."""
