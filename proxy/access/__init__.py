"""Who may pull what: client authentication (passwords, tokens the mirror issues) and
per-repository pull rules."""
