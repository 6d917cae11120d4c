"""The stage runtime: how a stage script logs, fails and exits (stage, errors), reads its
configuration (config) and writes its files atomically (files)."""
