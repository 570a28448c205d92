"""The command line: flags of each entry point, YAML configs, and one-line errors for a user's mistakes."""
