"""The swarm simulator: peer processes on loopback or in network namespaces, faults, history checks."""
