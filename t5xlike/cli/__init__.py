"""What the command-line entry points share: flags, gin files, `jax.distributed`, exit codes."""
