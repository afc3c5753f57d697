"""The peers: the same pages written on other stacks, one small module each."""
