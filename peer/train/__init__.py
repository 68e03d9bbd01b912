"""Training strategies built on the swarm: DiLoCo (and its pure outer-step maths)."""
